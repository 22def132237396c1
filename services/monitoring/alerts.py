"""Alert rules and the alerts they raise.

A rule is a condition over a target (an endpoint, a model version, or a version on an endpoint),
evaluated every `interval_seconds` over the last `window_seconds` of predictions. An evaluation
gives a `Verdict` per target it could judge (a model version's rows, or the endpoint's serving
metrics): firing or not, with the value compared. `AlertStore.apply` turns verdicts into alert
changes in one transaction:

- firing, no open alert for (rule, target): an alert opens (state firing);
- firing, an open alert: its value and last-seen time are updated;
- not firing, an open alert: it resolves.

A target the evaluation could not judge (no rows in the window, no reference, too few labels)
changes nothing: an alert stays open until its condition is seen to clear. One open alert per rule
and target holds across replicas through a unique key that only open alerts carry. Each change
queues the webhook deliveries it causes in the same transaction (webhooks.py: an outbox), so an
event is never lost between the change and the POST.

Scheduling: `claim_due` moves a due rule's `next_evaluation_time` forward by compare-and-set, so
one replica evaluates each tick, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from services.common.db import Database
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, StrataError, quote
from services.common.limits import check_text, check_version
from services.common.names import check_name
from services.common.paging import PageRequest
from services.common.timeutil import as_utc, utc_now
from services.monitoring import tables as t
from services.monitoring.drift import Method, Override
from services.monitoring.references import version_name

log = logging.getLogger("strata.monitoring.alerts")

DEFAULT_WINDOW_SECONDS = 3600
DEFAULT_INTERVAL_SECONDS = 60
MAX_SECONDS = 90 * 86_400          # a window or an interval longer than 90 days is a mistake
DEFAULT_MIN_ROWS = 100
MAX_TEXT = 1000                    # description, comment


class ConditionKind(enum.IntEnum):
    """The proto's numbers."""

    UNSPECIFIED = 0
    DATASET_DRIFT = 1
    COLUMN_DRIFT = 2
    PERFORMANCE = 3
    ERROR_RATE = 4
    LATENCY_P99 = 5


class AlertState(enum.StrEnum):
    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class AlertEvent(enum.StrEnum):
    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


#: Performance metrics by task; the second set is where lower is better (the rule fires above).
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss")
REGRESSION_METRICS = ("mae", "rmse", "mape", "r2")
LOWER_IS_BETTER = frozenset({"log_loss", "mae", "rmse", "mape"})


@dataclass(frozen=True)
class Condition:
    kind: ConditionKind
    threshold: float = 0.0
    column: str = ""
    drift_method: Method | None = None
    metric: str = ""
    min_rows: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.name.lower()
        d["drift_method"] = str(self.drift_method) if self.drift_method else ""
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Condition:
        return cls(ConditionKind[d["kind"].upper()], float(d["threshold"]), d["column"],
                   Method(d["drift_method"]) if d["drift_method"] else None, d["metric"], int(d["min_rows"]))

    @property
    def rows_needed(self) -> int:
        return self.min_rows or DEFAULT_MIN_ROWS


@dataclass(frozen=True)
class RuleSpec:
    """What a client sets."""

    name: str
    description: str
    endpoint: str
    model: str
    version: int
    condition: Condition
    window_seconds: int
    interval_seconds: int
    training_schedule_id: str
    enabled: bool


@dataclass(frozen=True)
class Rule:
    spec: RuleSpec
    created_by: str
    create_time: datetime
    update_time: datetime
    last_evaluation_time: datetime | None
    last_evaluation_note: str


@dataclass(frozen=True)
class Alert:
    alert_id: str
    rule: str
    target: str
    state: AlertState
    value: float
    threshold: float
    message: str
    open_time: datetime
    last_seen_time: datetime
    acknowledged_by: str
    acknowledge_time: datetime | None
    acknowledge_comment: str
    resolve_time: datetime | None
    training_job_id: str
    trigger_error: str


@dataclass(frozen=True)
class Verdict:
    """An evaluation's judgement of one target."""

    target: str
    firing: bool
    value: float
    threshold: float
    message: str


def check_rule(spec: RuleSpec, field: str = "rule") -> RuleSpec:
    """The spec with defaults filled in, or INVALID_ARGUMENT naming the field."""
    check_name(spec.name, f"{field}.name")
    check_text(spec.description, f"{field}.description", MAX_TEXT)
    if spec.endpoint:
        check_name(spec.endpoint, f"{field}.endpoint")
    if spec.model:
        check_name(spec.model, f"{field}.model")
        check_version(spec.version, f"{field}.version")
    elif spec.version:
        raise InvalidArgument(f"{field}.model", "is required with version")
    if not spec.endpoint and not spec.model:
        raise InvalidArgument(f"{field}.endpoint", "name an endpoint, or a model and version")
    c, where = spec.condition, f"{field}.condition"
    if not math.isfinite(c.threshold):
        raise InvalidArgument(f"{where}.threshold", f"must be a finite number; got {c.threshold}")
    if c.min_rows < 0 or c.min_rows > 1_000_000_000:
        raise InvalidArgument(f"{where}.min_rows", "must be within 0..1,000,000,000 (0: 100)")
    if c.kind == ConditionKind.UNSPECIFIED:
        raise InvalidArgument(f"{where}.kind", "is required")
    if c.kind == ConditionKind.DATASET_DRIFT and not 0 <= c.threshold <= 1:
        raise InvalidArgument(f"{where}.threshold", f"is the share of drifted features: within [0, 1] (0: 0.5); "
                                                    f"got {c.threshold}")
    if c.kind == ConditionKind.COLUMN_DRIFT:
        if not c.column:
            raise InvalidArgument(f"{where}.column", "is required for a column's drift")
        check_text(c.column, f"{where}.column", 256)
        if c.threshold < 0:
            raise InvalidArgument(f"{where}.threshold", f"must be at least 0 (0: the method's default); got {c.threshold}")
    if c.kind == ConditionKind.PERFORMANCE and c.metric not in CLASSIFICATION_METRICS + REGRESSION_METRICS:
        raise InvalidArgument(f"{where}.metric", f"{quote(c.metric)} is not one of "
                                                 f"{', '.join(CLASSIFICATION_METRICS + REGRESSION_METRICS)}")
    if c.kind == ConditionKind.ERROR_RATE and not 0 <= c.threshold < 1:
        raise InvalidArgument(f"{where}.threshold", f"is a fraction of requests: within [0, 1); got {c.threshold}")
    if c.kind == ConditionKind.LATENCY_P99 and c.threshold <= 0:
        raise InvalidArgument(f"{where}.threshold", f"is milliseconds: above 0; got {c.threshold}")
    if c.kind in (ConditionKind.ERROR_RATE, ConditionKind.LATENCY_P99) and not spec.endpoint:
        raise InvalidArgument(f"{field}.endpoint", "is required: serving metrics are kept per endpoint")
    if c.kind != ConditionKind.COLUMN_DRIFT and (c.column or c.drift_method):
        raise InvalidArgument(f"{where}.column", "is only for a column's drift")
    if c.kind != ConditionKind.PERFORMANCE and c.metric:
        raise InvalidArgument(f"{where}.metric", "is only for a performance condition")
    window = spec.window_seconds or DEFAULT_WINDOW_SECONDS
    interval = spec.interval_seconds or DEFAULT_INTERVAL_SECONDS
    for name, value in (("window_seconds", window), ("interval_seconds", interval)):
        if not 1 <= value <= MAX_SECONDS:
            raise InvalidArgument(f"{field}.{name}", f"must be within 1..{MAX_SECONDS} (0: the default); got {value}")
    if spec.training_schedule_id and (len(spec.training_schedule_id) > 128
                                      or not spec.training_schedule_id.isprintable()):
        raise InvalidArgument(f"{field}.training_schedule_id", "is not a schedule id (printable, at most 128)")
    return replace(spec, window_seconds=window, interval_seconds=interval)


def check_uuid(value: str, field: str) -> str:
    """An id this service issued (a UUID in its canonical form), or INVALID_ARGUMENT naming the field."""
    try:
        if str(uuid.UUID(value)) == value:
            return value
    except ValueError:
        pass
    raise InvalidArgument(field, f"{quote(value)} is not an id (a UUID)")


def rule_name(name: str) -> str:
    return f"monitoring/alert-rules/{name}"


class AlertStore:
    def __init__(self, db: Database, on_event: Callable[[Connection, Rule, Alert, AlertEvent], None],
                 clock: Callable[[], datetime] = utc_now) -> None:
        """`on_event` queues what an alert change causes (webhook deliveries), inside the
        transaction that makes the change."""
        self.db = db
        self.on_event = on_event
        self.clock = clock

    # -- rules ---------------------------------------------------------------------------------
    def create(self, spec: RuleSpec, principal: str) -> Rule:
        spec = check_rule(spec)
        now = self.clock()
        row = {**_spec_row(spec), "created_by": principal, "create_time": now, "update_time": now,
               "next_evaluation_time": now, "last_evaluation_time": None, "last_evaluation_note": ""}
        try:
            with self.db.session() as c:
                c.execute(insert(t.alert_rules).values(**row))
        except IntegrityError:
            raise AlreadyExists(f"{rule_name(spec.name)} already exists") from None
        return self.get(spec.name)

    def update(self, spec: RuleSpec) -> Rule:
        spec = check_rule(spec)
        now = self.clock()
        with self.db.session() as c:
            done = c.execute(update(t.alert_rules).where(t.alert_rules.c.name == spec.name).values(
                **_spec_row(spec), update_time=now, next_evaluation_time=now)).rowcount
        if not done:
            raise NotFound(f"{rule_name(spec.name)} not found")
        return self.get(spec.name)

    def get(self, name: str) -> Rule:
        check_name(name)
        with self.db.read() as c:
            row = c.execute(select(t.alert_rules).where(t.alert_rules.c.name == name)).first()
        if row is None:
            raise NotFound(f"{rule_name(name)} not found")
        return _rule(row)

    def list(self, page_size: int, page_token: str) -> tuple[list[Rule], str]:
        page = PageRequest.parse("ListAlertRules", page_size, page_token, key=str)
        q = select(t.alert_rules).order_by(t.alert_rules.c.name).limit(page.limit)
        if page.after is not None:
            q = q.where(t.alert_rules.c.name > page.after)
        with self.db.read() as c:
            rows = [_rule(r) for r in c.execute(q)]
        return page.cut(rows, lambda r: r.spec.name)

    def delete(self, name: str) -> None:
        """Delete the rule and resolve its open alerts (their webhooks are told)."""
        rule = self.get(name)
        now = self.clock()
        with self.db.session() as c:
            for alert in self._open(c, name):
                self._resolve(c, rule, alert, now)
            if not c.execute(delete(t.alert_rules).where(t.alert_rules.c.name == name)).rowcount:
                raise NotFound(f"{rule_name(name)} not found")

    def claim_due(self, now: datetime) -> list[Rule]:
        """The enabled rules due for evaluation that this caller won (their next evaluation
        moved forward by compare-and-set: another replica that read the same row loses)."""
        r = t.alert_rules.c
        with self.db.read() as c:
            due = c.execute(select(r.name, r.next_evaluation_time, r.interval_seconds).where(
                r.enabled.is_(True), r.next_evaluation_time <= now)).all()
        won = []
        for name, when, interval in due:
            with self.db.session() as c:
                if c.execute(update(t.alert_rules).where(r.name == name, r.next_evaluation_time == when).values(
                        next_evaluation_time=now + timedelta(seconds=interval))).rowcount:
                    won.append(name)
        rules = []
        for name in won:
            try:
                rules.append(self.get(name))
            except NotFound:  # deleted meanwhile
                pass
        return rules

    def next_due(self) -> datetime | None:
        r = t.alert_rules.c
        with self.db.read() as c:
            when = c.execute(select(r.next_evaluation_time).where(r.enabled.is_(True)).order_by(
                r.next_evaluation_time).limit(1)).scalar()
        return as_utc(when)

    # -- alerts --------------------------------------------------------------------------------
    def apply(self, rule: Rule, verdicts: Sequence[Verdict], note: str, now: datetime) -> list[Alert]:
        """Open, update or resolve the rule's alerts by the verdicts; record the evaluation.
        Returns the alerts this call opened."""
        opened = []
        with self.db.session() as c:
            open_alerts = {a.target: a for a in self._open(c, rule.spec.name)}
            for v in verdicts:
                current = open_alerts.get(v.target)
                if v.firing and current is None:
                    opened.append(self._open_alert(c, rule, v, now))
                elif v.firing and current is not None:
                    c.execute(update(t.alerts).where(t.alerts.c.alert_id == current.alert_id).values(
                        value=v.value, message=v.message, last_seen_time=now))
                elif current is not None:
                    self._resolve(c, rule, current, now)
            c.execute(update(t.alert_rules).where(t.alert_rules.c.name == rule.spec.name).values(
                last_evaluation_time=now, last_evaluation_note=note[:MAX_TEXT * 4]))
        return opened

    def _open_alert(self, c: Connection, rule: Rule, v: Verdict, now: datetime) -> Alert:
        alert = Alert(str(uuid.uuid4()), rule.spec.name, v.target, AlertState.FIRING, v.value, v.threshold,
                      v.message, now, now, "", None, "", None, "", "")
        # (a replica that opened the same alert first wins the unique open_key: the caller's
        # transaction fails and this evaluation is dropped, as if the other replica had made it)
        c.execute(insert(t.alerts).values(**_alert_row(alert), open_key=_open_key(rule.spec.name, v.target)))
        self.on_event(c, rule, alert, AlertEvent.FIRING)
        return alert

    def _resolve(self, c: Connection, rule: Rule, alert: Alert, now: datetime) -> None:
        c.execute(update(t.alerts).where(t.alerts.c.alert_id == alert.alert_id).values(
            state=AlertState.RESOLVED.value, open_key=None, resolve_time=now))
        self.on_event(c, rule, replace(alert, state=AlertState.RESOLVED, resolve_time=now), AlertEvent.RESOLVED)

    def _open(self, c: Connection, rule: str) -> list[Alert]:
        a = t.alerts.c
        return [_alert(r) for r in c.execute(select(t.alerts).where(a.rule == rule, a.open_key.is_not(None)))]

    def open_alerts(self, rule: str) -> list[Alert]:
        with self.db.read() as c:
            return self._open(c, rule)

    def acknowledge(self, alert_id: str, principal: str, comment: str) -> Alert:
        check_text(comment, "comment", MAX_TEXT)
        alert = self.get_alert(alert_id)
        if alert.state == AlertState.RESOLVED:
            raise FailedPrecondition(f"monitoring/alerts/{alert_id} is resolved", field="alert_id")
        now = self.clock()
        with self.db.session() as c:
            done = c.execute(update(t.alerts).where(t.alerts.c.alert_id == alert_id,
                                                    t.alerts.c.open_key.is_not(None)).values(
                state=AlertState.ACKNOWLEDGED.value, acknowledged_by=principal, acknowledge_time=now,
                acknowledge_comment=comment)).rowcount
            if not done:  # resolved meanwhile
                raise FailedPrecondition(f"monitoring/alerts/{alert_id} is resolved", field="alert_id")
            acked = replace(alert, state=AlertState.ACKNOWLEDGED, acknowledged_by=principal, acknowledge_time=now,
                            acknowledge_comment=comment)
            rule = c.execute(select(t.alert_rules).where(t.alert_rules.c.name == alert.rule)).first()
            if rule is not None:
                self.on_event(c, _rule(rule), acked, AlertEvent.ACKNOWLEDGED)
        return acked

    def get_alert(self, alert_id: str) -> Alert:
        check_uuid(alert_id, "alert_id")
        with self.db.read() as c:
            row = c.execute(select(t.alerts).where(t.alerts.c.alert_id == alert_id)).first()
        if row is None:
            raise NotFound(f"monitoring/alerts/{quote(alert_id, bare=True)} not found")
        return _alert(row)

    def list_alerts(self, rule: str, state: AlertState | None, page_size: int,
                    page_token: str) -> tuple[list[Alert], str]:
        if rule:
            check_name(rule, "rule")
        page = PageRequest.parse("ListAlerts", page_size, page_token,
                                 {"rule": rule, "state": state.value if state else ""}, key=int)
        a = t.alerts.c
        q = select(t.alerts).order_by(a.seq.desc()).limit(page.limit)
        if rule:
            q = q.where(a.rule == rule)
        if state:
            q = q.where(a.state == state.value)
        if page.after is not None:
            q = q.where(a.seq < page.after)
        with self.db.read() as c:
            rows = c.execute(q).all()
        items, token = page.cut(rows, lambda r: r.seq)
        return [_alert(r) for r in items], token

    def set_trigger(self, alert_id: str, job_id: str, error: str) -> None:
        with self.db.session() as c:
            c.execute(update(t.alerts).where(t.alerts.c.alert_id == alert_id).values(
                training_job_id=job_id, trigger_error=error[:MAX_TEXT]))


def _open_key(rule: str, target: str) -> str:
    return f"{rule}\n{target}"


def _spec_row(spec: RuleSpec) -> dict:
    return {"name": spec.name, "description": spec.description, "endpoint": spec.endpoint, "model": spec.model,
            "version": spec.version, "condition": spec.condition.to_dict(), "window_seconds": spec.window_seconds,
            "interval_seconds": spec.interval_seconds, "training_schedule_id": spec.training_schedule_id,
            "enabled": spec.enabled}


def _rule(r: Row) -> Rule:
    spec = RuleSpec(r.name, r.description, r.endpoint, r.model, r.version, Condition.from_dict(r.condition),
                    r.window_seconds, r.interval_seconds, r.training_schedule_id, r.enabled)
    return Rule(spec, r.created_by, as_utc(r.create_time), as_utc(r.update_time), as_utc(r.last_evaluation_time),
                r.last_evaluation_note)


def _alert_row(a: Alert) -> dict:
    return {"alert_id": a.alert_id, "rule": a.rule, "target": a.target, "state": a.state.value, "value": a.value,
            "threshold": a.threshold, "message": a.message, "open_time": a.open_time,
            "last_seen_time": a.last_seen_time, "acknowledged_by": a.acknowledged_by,
            "acknowledge_time": a.acknowledge_time, "acknowledge_comment": a.acknowledge_comment,
            "resolve_time": a.resolve_time, "training_job_id": a.training_job_id, "trigger_error": a.trigger_error}


def _alert(r: Row) -> Alert:
    return Alert(r.alert_id, r.rule, r.target, AlertState(r.state), r.value, r.threshold, r.message,
                 as_utc(r.open_time), as_utc(r.last_seen_time), r.acknowledged_by, as_utc(r.acknowledge_time),
                 r.acknowledge_comment, as_utc(r.resolve_time), r.training_job_id, r.trigger_error)


def version_target(model: str, version: int, shadow: bool) -> str:
    return version_name(model, version) + ("/shadow" if shadow else "")


# -- evaluation -------------------------------------------------------------------------------------

class TrainingTrigger(Protocol):
    def trigger(self, schedule_id: str, reason: str, request_id: str) -> str:
        """Submit the schedule's job template; returns the job id (idempotent by request_id)."""
        ...


Judge = Callable[[Rule, datetime], tuple[list[Verdict], list[str]]]


class AlertEvaluator:
    """Evaluates rules (`judge`: a rule and the time -> verdicts and notes on what could not be
    judged), applies the verdicts, and triggers the training schedules of the alerts opened."""

    def __init__(self, store: AlertStore, judge: Judge, trigger: TrainingTrigger | None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.store = store
        self.judge = judge
        self.trigger = trigger
        self.clock = clock

    def evaluate(self, rule: Rule) -> list[Alert]:
        """One evaluation; returns the rule's open alerts after it."""
        now = self.clock()
        try:
            verdicts, notes = self.judge(rule, now)
        except StrataError as e:  # the whole target could not be judged (no rows, no reference...)
            verdicts, notes = [], [str(e)]
        try:
            self.store.apply(rule, verdicts, "; ".join(notes), now)
        except IntegrityError:  # another replica opened the same alert at the same moment
            log.info("alert opened by another replica", extra={"fields": {"rule": rule.spec.name}})
        open_alerts = self.store.open_alerts(rule.spec.name)
        if rule.spec.training_schedule_id and self.trigger is not None:
            for alert in open_alerts:
                if not alert.training_job_id:  # new, or its trigger failed before: (again) now
                    self._trigger(rule, alert)
            open_alerts = self.store.open_alerts(rule.spec.name)
        return open_alerts

    def _trigger(self, rule: Rule, alert: Alert) -> None:
        # (the same reason on every retry: the request id's payload must not change)
        reason = f"alert {alert.alert_id} of rule {rule.spec.name} on {alert.target}"
        try:
            job = self.trigger.trigger(rule.spec.training_schedule_id, reason, f"alert-{alert.alert_id}")
            self.store.set_trigger(alert.alert_id, job, "")
        except StrataError as e:
            log.warning("training trigger failed", extra={"fields": {"rule": rule.spec.name, "error": str(e)}})
            self.store.set_trigger(alert.alert_id, "", str(e))

    def run_due(self) -> int:
        """Evaluate every rule due now that this replica claims; returns how many."""
        rules = self.store.claim_due(self.clock())
        for rule in rules:
            try:
                self.evaluate(rule)
            except Exception:  # one broken rule must not stop the others
                log.exception("rule evaluation failed", extra={"fields": {"rule": rule.spec.name}})
        return len(rules)

    def run(self, stop: threading.Event, tick: float) -> None:
        """The scheduler loop (a thread), every `tick` seconds until `stop` is set."""
        while not stop.is_set():
            try:
                self.run_due()
            except Exception:  # the database is down: try again next tick
                log.exception("alert scheduling failed")
            stop.wait(tick)


def describe_columns(names: Iterable[str], limit: int = 10) -> str:
    names = list(names)
    shown = ", ".join(quote(n, bare=True) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def drift_override(c: Condition) -> Override:
    return Override(c.drift_method, c.threshold or None)

