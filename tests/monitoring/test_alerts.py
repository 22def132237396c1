"""Alert rules, webhooks and serving metrics without gRPC, on SQLite and PostgreSQL: one open alert
per rule and target (also when two replicas race), a tick evaluated once across replicas, webhook
deliveries signed, retried with backoff and given up, against a real HTTP receiver, and the serving
metrics read from a real Prometheus exposition as Prometheus' increase() and histogram_quantile()
read them."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from services.common.db import Database
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.monitoring.alerts import (
    AlertEvaluator, AlertState, AlertStore, Condition, ConditionKind, Rule, RuleSpec, Verdict, check_rule)
from services.monitoring.serving_metrics import ServingMetrics, histogram_quantile
from services.monitoring.webhooks import Deliverer, DeliveryState, WebhookSpec, WebhookStore, sign


def spec(name: str = "drift", **kw: object) -> RuleSpec:
    base = dict(name=name, description="", endpoint="", model="m", version=1,
                condition=Condition(ConditionKind.DATASET_DRIFT), window_seconds=0, interval_seconds=0,
                training_schedule_id="", enabled=True)
    return RuleSpec(**{**base, **kw})  # type: ignore[arg-type]


class Receiver:
    """A real HTTP server that records the POSTs it gets and answers with the next queued status."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        self.statuses = list(statuses or [])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((time.monotonic(), dict(self.headers), body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def verdicts(*targets: tuple[str, bool]) -> list[Verdict]:
    return [Verdict(t, firing, 0.75 if firing else 0.1, 0.5, "features drifted" if firing else "") for t, firing in targets]


# -- rules -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "field"), [
    (dict(name="Bad Name"), "rule.name"),
    (dict(model="", version=0), "rule.endpoint"),
    (dict(version=0), "rule.version"),
    (dict(condition=Condition(ConditionKind.UNSPECIFIED)), "rule.condition.kind"),
    (dict(condition=Condition(ConditionKind.DATASET_DRIFT, threshold=1.5)), "rule.condition.threshold"),
    (dict(condition=Condition(ConditionKind.COLUMN_DRIFT)), "rule.condition.column"),
    (dict(condition=Condition(ConditionKind.PERFORMANCE, metric="auc")), "rule.condition.metric"),
    (dict(condition=Condition(ConditionKind.LATENCY_P99, threshold=5)), "rule.endpoint"),
    (dict(condition=Condition(ConditionKind.ERROR_RATE, threshold=math.nan), endpoint="e"), "rule.condition.threshold"),
    (dict(window_seconds=-1), "rule.window_seconds"),
    (dict(interval_seconds=10**9), "rule.interval_seconds"),
])
def test_an_invalid_rule_is_refused_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        check_rule(spec(**change))
    assert e.value.field == field


def test_one_open_alert_per_rule_and_target_until_it_resolves(db: Database) -> None:
    events: list[tuple[str, str, str]] = []
    store = AlertStore(db, on_event=lambda c, rule, alert, event: events.append((alert.target, alert.state, event)))
    rule = store.create(spec(), "alice")
    with pytest.raises(AlreadyExists):
        store.create(spec(), "bob")
    now = datetime.now(UTC)
    v1, v2 = "models/m/versions/1", "models/m/versions/1/shadow"
    opened = store.apply(rule, verdicts((v1, True), (v2, False)), "", now)
    assert [a.target for a in opened] == [v1]
    assert store.apply(rule, verdicts((v1, True), (v2, True)), "", now + timedelta(seconds=1))[0].target == v2
    assert store.apply(rule, verdicts((v1, True)), "", now + timedelta(seconds=2)) == []  # still the same one
    assert sorted(a.target for a in store.open_alerts("drift")) == [v1, v2]
    store.apply(rule, [], "no rows in the window", now + timedelta(seconds=3))  # no verdict: nothing changes
    assert len(store.open_alerts("drift")) == 2
    first = next(a for a in store.open_alerts("drift") if a.target == v1)
    acked = store.acknowledge(first.alert_id, "carol", "looking")
    assert (acked.state, acked.acknowledged_by) == (AlertState.ACKNOWLEDGED, "carol")
    store.apply(rule, verdicts((v1, False), (v2, True)), "", now + timedelta(seconds=4))
    assert [a.target for a in store.open_alerts("drift")] == [v2]
    with pytest.raises(FailedPrecondition):
        store.acknowledge(first.alert_id, "carol", "again")
    reopened = store.apply(rule, verdicts((v1, True)), "", now + timedelta(seconds=5))
    assert len(reopened) == 1 and reopened[0].alert_id != first.alert_id
    alerts, _ = store.list_alerts("drift", None, 10, "")
    assert [(a.target, a.state) for a in alerts] == [(v1, AlertState.FIRING), (v2, AlertState.FIRING),
                                                     (v1, AlertState.RESOLVED)]
    assert events == [(v1, "firing", "firing"), (v2, "firing", "firing"), (v1, "acknowledged", "acknowledged"),
                      (v1, "resolved", "resolved"), (v1, "firing", "firing")]
    store.delete("drift")  # resolves what is open, and tells the webhooks
    assert store.open_alerts("drift") == []
    assert sorted(events[-2:]) == [(v1, "resolved", "resolved"), (v2, "resolved", "resolved")]
    with pytest.raises(NotFound):
        store.get("drift")


def test_two_replicas_racing_open_one_alert_and_claim_each_tick_once(db: Database, database_url: str) -> None:
    other_db = Database(database_url)
    try:
        stores = [AlertStore(d, on_event=lambda *a: None) for d in (db, other_db)]
        stores[0].create(spec(interval_seconds=60), "alice")
        now = datetime.now(UTC)
        claimed: list[list[Rule]] = [[], []]
        barrier = threading.Barrier(2)

        def claim(i: int) -> None:
            barrier.wait()
            claimed[i] = stores[i].claim_due(now + timedelta(seconds=1))

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(len(c) for c in claimed) == [0, 1]
        assert stores[0].claim_due(now + timedelta(seconds=30)) == []     # not due before the interval
        assert len(stores[1].claim_due(now + timedelta(seconds=62))) == 1

        rule = stores[0].get("drift")
        evaluators = [AlertEvaluator(s, lambda r, t: (verdicts(("models/m/versions/1", True)), []), None)
                      for s in stores]
        barrier = threading.Barrier(2)

        def evaluate(i: int) -> None:
            barrier.wait()
            evaluators[i].evaluate(rule)

        threads = [threading.Thread(target=evaluate, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        alerts, _ = stores[0].list_alerts("drift", None, 10, "")
        assert len(alerts) == 1
    finally:
        other_db.dispose()


def test_a_failed_training_trigger_is_recorded_and_retried_while_the_alert_is_open(db: Database) -> None:
    calls: list[tuple[str, str]] = []

    class Trigger:
        def trigger(self, schedule_id: str, reason: str, request_id: str) -> str:
            calls.append((schedule_id, request_id))
            if len(calls) == 1:
                raise FailedPrecondition("the training service refused training/schedules/s1: UNAVAILABLE")
            return "job-1"

    store = AlertStore(db, on_event=lambda *a: None)
    rule = store.create(spec(training_schedule_id="s1"), "alice")
    evaluator = AlertEvaluator(store, lambda r, t: (verdicts(("models/m/versions/1", True)), []), Trigger())
    [alert] = evaluator.evaluate(rule)
    assert alert.training_job_id == "" and "UNAVAILABLE" in alert.trigger_error
    [alert] = evaluator.evaluate(rule)
    assert (alert.training_job_id, alert.trigger_error) == ("job-1", "")
    evaluator.evaluate(rule)
    assert calls == [("s1", f"alert-{alert.alert_id}")] * 2  # the same idempotency key; none after success


# -- webhooks --------------------------------------------------------------------------------------

def queue_one(db: Database, hooks: WebhookStore, name: str = "drift") -> None:
    store = AlertStore(db, on_event=hooks.queue)
    rule = store.create(spec(name), "alice")
    store.apply(rule, verdicts(("models/m/versions/1", True)), "", datetime.now(UTC))


def test_a_delivery_is_signed_and_retried_with_backoff_until_the_receiver_takes_it(db: Database) -> None:
    receiver = Receiver([500, 503, 200])
    try:
        hooks = WebhookStore(db)
        hook, secret = hooks.create(WebhookSpec(receiver.url, (), (), "ops"), "", "admin")
        assert len(secret) >= 32
        queue_one(db, hooks)
        deliverer = Deliverer(db, max_attempts=5, backoff=0.3, max_backoff=10, timeout=5)
        deadline = time.monotonic() + 20
        while len(receiver.requests) < 3 and time.monotonic() < deadline:
            deliverer.deliver_due()
            time.sleep(0.05)
        deliverer.close()
        assert len(receiver.requests) == 3
        times = [r[0] for r in receiver.requests]
        assert times[1] - times[0] >= 0.3 * 0.8 and times[2] - times[1] >= 0.6 * 0.8  # doubling
        ids = {r[1]["X-Strata-Delivery"] for r in receiver.requests}
        assert len(ids) == 1  # one delivery, attempted three times
        for _, headers, body in receiver.requests:
            t, v1 = (p.split("=", 1)[1] for p in headers["X-Strata-Signature"].split(","))
            assert hmac.compare_digest(v1, hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest())
            assert headers["X-Strata-Event"] == "firing"
        event = json.loads(receiver.requests[-1][2])
        assert (event["event"], event["alert"]["target"], event["rule"]["name"]) == ("firing", "models/m/versions/1",
                                                                                     "drift")
        [d] = hooks.deliveries(hook.webhook_id, 10, "")[0]
        assert (d.state, d.attempts, d.last_status) == (DeliveryState.DELIVERED, 3, 200)
    finally:
        receiver.close()


def test_a_delivery_fails_after_its_attempts_and_filters_apply(db: Database, receiver: Receiver) -> None:
    receiver.statuses = [500] * 10
    hooks = WebhookStore(db)
    hook, _ = hooks.create(WebhookSpec(receiver.url, (), ("drift",), ""), "s" * 16, "admin")
    hooks.create(WebhookSpec(receiver.url, (), ("other",), ""), "", "admin")  # another rule's: not told
    with pytest.raises(InvalidArgument) as e:
        hooks.create(WebhookSpec("file:///etc/passwd", (), (), ""), "", "admin")
    assert e.value.field == "webhook.url"
    with pytest.raises(InvalidArgument) as e:
        hooks.create(WebhookSpec(receiver.url, (), (), ""), "short", "admin")
    assert e.value.field == "secret"
    queue_one(db, hooks)
    deliverer = Deliverer(db, max_attempts=2, backoff=0.05, max_backoff=1, timeout=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        deliverer.deliver_due()
        [d] = hooks.deliveries(hook.webhook_id, 10, "")[0]
        if d.state != DeliveryState.PENDING:
            break
        time.sleep(0.05)
    deliverer.close()
    assert (d.state, d.attempts, d.last_status) == (DeliveryState.FAILED, 2, 500)
    assert len(receiver.requests) == 2


def test_signature_format() -> None:
    assert sign("k" * 16, 1700000000, b"{}") == "t=1700000000,v1=" + hmac.new(
        b"k" * 16, b"1700000000.{}", hashlib.sha256).hexdigest()


# -- serving metrics -------------------------------------------------------------------------------

@pytest.mark.parametrize(("q", "expected"), [(0.5, 0.1), (0.7, 0.15), (0.9, 0.2), (0.99, 0.2), (0.25, 0.05)])
def test_histogram_quantile_reads_buckets_as_prometheus_does(q: float, expected: float) -> None:
    # 50 observations <= 0.1, 40 in (0.1, 0.2], 10 above: Prometheus interpolates within a bucket
    # and answers the highest finite bound for a rank in +Inf.
    assert histogram_quantile(q, {0.1: 50, 0.2: 90, math.inf: 100}) == pytest.approx(expected)
    assert math.isnan(histogram_quantile(q, {0.1: 0, math.inf: 0}))


def test_serving_metrics_take_increases_over_the_window_across_a_restart(tmp_path: Path) -> None:
    """The inference service's metric names, exposed by prometheus_client as the service does."""
    def exposition(ok: int, errors: int, latencies: list[float]) -> str:
        reg = CollectorRegistry()
        c = Counter("strata_inference_predictions", "", ["endpoint", "model", "version", "outcome"], registry=reg)
        h = Histogram("strata_inference_prediction_seconds", "", ["endpoint", "model", "version"], registry=reg,
                      buckets=(.001, .002, .005, .01, .05))
        c.labels("e", "m", "1", "ok").inc(ok)
        c.labels("e", "m", "1", "error").inc(errors)
        c.labels("other", "m", "1", "error").inc(1000)  # another endpoint's: not counted
        for x in latencies:
            h.labels("e", "m", "1").observe(x)
        return generate_latest(reg).decode()

    pages = {"now": exposition(100, 0, [0.001] * 100)}
    clock = [1000.0]
    metrics = ServingMetrics(["http://inference/metrics"], fetch=lambda url, timeout: pages["now"],
                             clock=lambda: clock[0])
    metrics.sample()
    clock[0] += 60
    pages["now"] = exposition(1000, 100, [0.001] * 1000 + [0.04] * 100)
    metrics.sample()
    w = metrics.window("e", "", 0, 60)
    assert (w.requests, w.errors) == (1000, 100) and w.error_rate == pytest.approx(100 / 1000)
    # 1,000 new observations: 900 in (0, 0.001], 100 in (0.01, 0.05]: p99 is in the last bucket
    assert histogram_quantile(0.99, w.buckets) == pytest.approx(0.01 + 0.04 * (990 - 900) / 100)
    clock[0] += 60
    pages["now"] = exposition(50, 50, [0.001] * 100)  # the process restarted: counters went down
    metrics.sample()
    w = metrics.window("e", "m", 1, 60)
    assert (w.requests, w.errors) == (100, 50)
    assert metrics.window("e", "m", 2, 60).requests == 0
