"""gRPC servicer of strata.monitoring.v1.AlertService: proto <-> domain only; the facade
(alerts_plane.py) decides."""

from __future__ import annotations

from strata.monitoring.v1 import alerts_pb2 as apb
from strata.monitoring.v1 import alerts_pb2_grpc

from services.common.audit import current_resource
from services.common.auth import current_principal
from services.monitoring import alerts_convert as convert
from services.monitoring.alerts_plane import AlertsPlane


def _rule_resource(name: str) -> None:
    current_resource.set(f"monitoring/alert-rules/{name[:128]}")


class AlertServicer(alerts_pb2_grpc.AlertServiceServicer):
    def __init__(self, plane: AlertsPlane) -> None:
        self.plane = plane

    async def CreateAlertRule(self, request: apb.CreateAlertRuleRequest, context) -> apb.CreateAlertRuleResponse:
        _rule_resource(request.rule.name)
        rule = await self.plane.create_rule(convert.rule_spec(request.rule), current_principal.get().subject)
        return apb.CreateAlertRuleResponse(rule=convert.rule_pb(rule))

    async def GetAlertRule(self, request: apb.GetAlertRuleRequest, context) -> apb.GetAlertRuleResponse:
        return apb.GetAlertRuleResponse(rule=convert.rule_pb(await self.plane.get_rule(request.name)))

    async def ListAlertRules(self, request: apb.ListAlertRulesRequest, context) -> apb.ListAlertRulesResponse:
        rules, token = await self.plane.list_rules(request.page_size, request.page_token)
        return apb.ListAlertRulesResponse(rules=[convert.rule_pb(r) for r in rules], next_page_token=token)

    async def UpdateAlertRule(self, request: apb.UpdateAlertRuleRequest, context) -> apb.UpdateAlertRuleResponse:
        _rule_resource(request.rule.name)
        rule = await self.plane.update_rule(convert.rule_spec(request.rule))
        return apb.UpdateAlertRuleResponse(rule=convert.rule_pb(rule))

    async def DeleteAlertRule(self, request: apb.DeleteAlertRuleRequest, context) -> apb.DeleteAlertRuleResponse:
        _rule_resource(request.name)
        await self.plane.delete_rule(request.name)
        return apb.DeleteAlertRuleResponse()

    async def EvaluateAlertRule(self, request: apb.EvaluateAlertRuleRequest,
                                context) -> apb.EvaluateAlertRuleResponse:
        _rule_resource(request.name)
        rule, open_alerts = await self.plane.evaluate_rule(request.name)
        return apb.EvaluateAlertRuleResponse(rule=convert.rule_pb(rule),
                                             open_alerts=[convert.alert_pb(a) for a in open_alerts])

    async def ListAlerts(self, request: apb.ListAlertsRequest, context) -> apb.ListAlertsResponse:
        alerts, token = await self.plane.list_alerts(request.rule, convert.alert_state(request.state),
                                                     request.page_size, request.page_token)
        return apb.ListAlertsResponse(alerts=[convert.alert_pb(a) for a in alerts], next_page_token=token)

    async def AcknowledgeAlert(self, request: apb.AcknowledgeAlertRequest, context) -> apb.AcknowledgeAlertResponse:
        current_resource.set(f"monitoring/alerts/{request.alert_id[:36]}")
        alert = await self.plane.acknowledge(request.alert_id, current_principal.get().subject, request.comment)
        return apb.AcknowledgeAlertResponse(alert=convert.alert_pb(alert))

    async def CreateWebhook(self, request: apb.CreateWebhookRequest, context) -> apb.CreateWebhookResponse:
        current_resource.set("monitoring/webhooks")
        hook, secret = await self.plane.create_webhook(convert.webhook_spec(request.webhook), request.secret,
                                                       current_principal.get().subject)
        return apb.CreateWebhookResponse(webhook=convert.webhook_pb(hook), secret=secret)

    async def ListWebhooks(self, request: apb.ListWebhooksRequest, context) -> apb.ListWebhooksResponse:
        hooks, token = await self.plane.list_webhooks(request.page_size, request.page_token)
        return apb.ListWebhooksResponse(webhooks=[convert.webhook_pb(h) for h in hooks], next_page_token=token)

    async def DeleteWebhook(self, request: apb.DeleteWebhookRequest, context) -> apb.DeleteWebhookResponse:
        current_resource.set(f"monitoring/webhooks/{request.webhook_id[:36]}")
        await self.plane.delete_webhook(request.webhook_id)
        return apb.DeleteWebhookResponse()

    async def ListWebhookDeliveries(self, request: apb.ListWebhookDeliveriesRequest,
                                    context) -> apb.ListWebhookDeliveriesResponse:
        items, token = await self.plane.deliveries(request.webhook_id, request.page_size, request.page_token)
        return apb.ListWebhookDeliveriesResponse(deliveries=[convert.delivery_pb(d) for d in items],
                                                 next_page_token=token)
