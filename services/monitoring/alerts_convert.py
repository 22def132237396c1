"""strata.monitoring.v1 alert messages <-> the plain types of alerts.py and webhooks.py."""

from __future__ import annotations

from strata.monitoring.v1 import alerts_pb2 as apb

from services.common.convert import timestamp_pb
from services.common.errors import InvalidArgument
from services.monitoring.alerts import Alert, AlertEvent, AlertState, Condition, ConditionKind, Rule, RuleSpec
from services.monitoring.convert import METHOD_PB, METHODS
from services.monitoring.webhooks import Delivery, DeliveryState, Webhook, WebhookSpec

STATE_PB = {AlertState.FIRING: apb.ALERT_STATE_FIRING, AlertState.ACKNOWLEDGED: apb.ALERT_STATE_ACKNOWLEDGED,
            AlertState.RESOLVED: apb.ALERT_STATE_RESOLVED}
STATES = {n: s for s, n in STATE_PB.items()}
EVENT_PB = {AlertEvent.FIRING: apb.ALERT_EVENT_FIRING, AlertEvent.ACKNOWLEDGED: apb.ALERT_EVENT_ACKNOWLEDGED,
            AlertEvent.RESOLVED: apb.ALERT_EVENT_RESOLVED}
EVENTS = {n: e for e, n in EVENT_PB.items()}
DELIVERY_PB = {DeliveryState.PENDING: apb.DELIVERY_STATE_PENDING, DeliveryState.DELIVERED: apb.DELIVERY_STATE_DELIVERED,
               DeliveryState.FAILED: apb.DELIVERY_STATE_FAILED}


def _ts(d):  # noqa: ANN001, ANN202 - an optional datetime -> an optional Timestamp
    return timestamp_pb(d) if d is not None else None


def rule_spec(r: apb.AlertRule, field: str = "rule") -> RuleSpec:
    c = r.condition
    if c.kind not in ConditionKind._value2member_map_:
        raise InvalidArgument(f"{field}.condition.kind", f"{c.kind} is not a ConditionKind")
    method = None
    if c.drift_method:
        if c.drift_method not in METHODS:
            raise InvalidArgument(f"{field}.condition.drift_method", f"{c.drift_method} is not a DriftMethod")
        method = METHODS[c.drift_method]
    condition = Condition(ConditionKind(c.kind), c.threshold, c.column, method, c.metric, c.min_rows)
    return RuleSpec(r.name, r.description, r.endpoint, r.model, r.version, condition, r.window_seconds,
                    r.interval_seconds, r.training_schedule_id, r.enabled)


def rule_pb(rule: Rule) -> apb.AlertRule:
    s, c = rule.spec, rule.spec.condition
    return apb.AlertRule(
        name=s.name, description=s.description, endpoint=s.endpoint, model=s.model, version=s.version,
        condition=apb.AlertCondition(kind=int(c.kind), threshold=c.threshold, column=c.column,
                                     drift_method=METHOD_PB[c.drift_method] if c.drift_method else 0,
                                     metric=c.metric, min_rows=c.min_rows),
        window_seconds=s.window_seconds, interval_seconds=s.interval_seconds,
        training_schedule_id=s.training_schedule_id, enabled=s.enabled, created_by=rule.created_by,
        create_time=timestamp_pb(rule.create_time), update_time=timestamp_pb(rule.update_time),
        last_evaluation_time=_ts(rule.last_evaluation_time), last_evaluation_note=rule.last_evaluation_note)


def alert_pb(a: Alert) -> apb.Alert:
    return apb.Alert(
        alert_id=a.alert_id, rule=a.rule, target=a.target, state=STATE_PB[a.state], value=a.value,
        threshold=a.threshold, message=a.message, open_time=timestamp_pb(a.open_time),
        last_seen_time=timestamp_pb(a.last_seen_time), acknowledged_by=a.acknowledged_by,
        acknowledge_time=_ts(a.acknowledge_time), acknowledge_comment=a.acknowledge_comment,
        resolve_time=_ts(a.resolve_time), training_job_id=a.training_job_id, trigger_error=a.trigger_error)


def alert_state(n: int) -> AlertState | None:
    if n == apb.ALERT_STATE_UNSPECIFIED:
        return None
    if n not in STATES:
        raise InvalidArgument("state", f"{n} is not an AlertState")
    return STATES[n]


def webhook_spec(w: apb.Webhook) -> WebhookSpec:
    events = []
    for i, n in enumerate(w.events):
        if n not in EVENTS:
            raise InvalidArgument(f"webhook.events[{i}]", f"{n} is not an AlertEvent (unspecified: leave the list empty)")
        events.append(EVENTS[n])
    return WebhookSpec(w.url, tuple(dict.fromkeys(events)), tuple(w.rules), w.description)


def webhook_pb(h: Webhook) -> apb.Webhook:
    return apb.Webhook(webhook_id=h.webhook_id, url=h.spec.url, events=[EVENT_PB[e] for e in h.spec.events],
                       rules=list(h.spec.rules), description=h.spec.description, created_by=h.created_by,
                       create_time=timestamp_pb(h.create_time))


def delivery_pb(d: Delivery) -> apb.WebhookDelivery:
    return apb.WebhookDelivery(delivery_id=d.delivery_id, webhook_id=d.webhook_id, alert_id=d.alert_id,
                               event=EVENT_PB[d.event], state=DELIVERY_PB[d.state], attempts=d.attempts,
                               last_status=d.last_status, last_error=d.last_error,
                               create_time=timestamp_pb(d.create_time), next_attempt_time=timestamp_pb(d.next_attempt_time))
