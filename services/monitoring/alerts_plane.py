"""The alerts facade: what the AlertService servicer calls, with plain types. Everything here
touches the database (or evaluates a rule), so it runs in a worker thread, never on the event
loop."""

from __future__ import annotations

import asyncio

from services.monitoring.alerts import Alert, AlertEvaluator, AlertState, AlertStore, Rule, RuleSpec
from services.monitoring.webhooks import Deliverer, Delivery, Webhook, WebhookSpec, WebhookStore


class AlertsPlane:
    def __init__(self, alerts: AlertStore, evaluator: AlertEvaluator, webhooks: WebhookStore,
                 deliverer: Deliverer) -> None:
        self.alerts = alerts
        self.evaluator = evaluator
        self.webhooks = webhooks
        self.deliverer = deliverer

    async def create_rule(self, spec: RuleSpec, principal: str) -> Rule:
        return await asyncio.to_thread(self.alerts.create, spec, principal)

    async def get_rule(self, name: str) -> Rule:
        return await asyncio.to_thread(self.alerts.get, name)

    async def list_rules(self, page_size: int, page_token: str) -> tuple[list[Rule], str]:
        return await asyncio.to_thread(self.alerts.list, page_size, page_token)

    async def update_rule(self, spec: RuleSpec) -> Rule:
        return await asyncio.to_thread(self.alerts.update, spec)

    async def delete_rule(self, name: str) -> None:
        await asyncio.to_thread(self.alerts.delete, name)
        self.deliverer.wake.set()

    async def evaluate_rule(self, name: str) -> tuple[Rule, list[Alert]]:
        def run() -> tuple[Rule, list[Alert]]:
            open_alerts = self.evaluator.evaluate(self.alerts.get(name))
            return self.alerts.get(name), open_alerts

        out = await asyncio.to_thread(run)
        self.deliverer.wake.set()
        return out

    async def list_alerts(self, rule: str, state: AlertState | None, page_size: int,
                          page_token: str) -> tuple[list[Alert], str]:
        return await asyncio.to_thread(self.alerts.list_alerts, rule, state, page_size, page_token)

    async def acknowledge(self, alert_id: str, principal: str, comment: str) -> Alert:
        alert = await asyncio.to_thread(self.alerts.acknowledge, alert_id, principal, comment)
        self.deliverer.wake.set()
        return alert

    async def create_webhook(self, spec: WebhookSpec, secret: str, principal: str) -> tuple[Webhook, str]:
        return await asyncio.to_thread(self.webhooks.create, spec, secret, principal)

    async def list_webhooks(self, page_size: int, page_token: str) -> tuple[list[Webhook], str]:
        return await asyncio.to_thread(self.webhooks.list, page_size, page_token)

    async def delete_webhook(self, webhook_id: str) -> None:
        await asyncio.to_thread(self.webhooks.delete, webhook_id)

    async def deliveries(self, webhook_id: str, page_size: int, page_token: str) -> tuple[list[Delivery], str]:
        return await asyncio.to_thread(self.webhooks.deliveries, webhook_id, page_size, page_token)
