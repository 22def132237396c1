"""Alerts through gRPC, as real processes (a registry, the monitoring service and the training
service, one artifact store): drift injected into ingested traffic opens an alert on the rule's
schedule, a signed webhook POST tells a real HTTP receiver, the rule's training schedule is
triggered once (a job queued in the training service), acknowledging and resolving are told too,
and bad rules are refused with the field named."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from strata.monitoring.v1 import alerts_pb2 as apb
from strata.monitoring.v1 import alerts_pb2_grpc
from strata.monitoring.v1 import monitoring_pb2 as pb
from strata.training.v1 import training_pb2 as tpb
from strata.training.v1 import training_pb2_grpc

from tests.monitoring.conftest import Platform, classifier_onnx, records, start_platform
from tests.monitoring.test_alerts import Receiver
from tests.monitoring.test_monitoring_grpc import classified, features, ingest, refused, register
from tests.processes import free_port, start_service, stop_process
from tests.training.conftest import breast_cancer


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Platform, str]]:
    """Registry and monitoring (SQLite; the alert store's backends are tested in test_alerts.py)
    evaluating rules every 0.2 s, and a training service without workers (a triggered job waits
    queued)."""
    home = tmp_path_factory.mktemp("alerts")
    tp = free_port()
    extra = {"STRATA_TRAINING_ADDR": f"127.0.0.1:{tp}", "STRATA_MONITORING_ALERT_TICK_SECONDS": "0.2",
             "STRATA_MONITORING_WEBHOOK_BACKOFF_SECONDS": "0.2", "STRATA_MONITORING_METRICS_URLS": "none",
             "STRATA_TRAINING_WORKERS": "0"}
    p = start_platform(home, f"sqlite:///{home / 'monitoring.db'}", extra)
    try:
        p.procs["training"] = start_service("training", home, tp, p.env)
        yield p, f"127.0.0.1:{tp}"
    finally:
        for proc in reversed(list(p.procs.values())):
            stop_process(proc)  # type: ignore[arg-type]


def alerts_stub(p: Platform) -> alerts_pb2_grpc.AlertServiceStub:
    return alerts_pb2_grpc.AlertServiceStub(grpc.insecure_channel(p.monitoring_addr))


def wait_for(predicate, timeout: float = 20.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def verified(secret: str, headers: dict[str, str], body: bytes) -> dict:
    t, v1 = (part.split("=", 1)[1] for part in headers["X-Strata-Signature"].split(","))
    assert abs(int(t) - time.time()) < 60
    assert hmac.compare_digest(v1, hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest())
    return json.loads(body)


def test_injected_drift_fires_an_alert_that_is_told_triggers_retraining_and_resolves(
        platform: tuple[Platform, str]) -> None:
    p, training_addr = platform
    stub, alerts, rng = p.monitoring(), alerts_stub(p), np.random.default_rng(11)
    version = register(p, "watched", classifier_onnx())
    ref = features(rng, 3000)
    (p.store / "refs").mkdir(exist_ok=True)
    pq.write_table(pa.table(ref), p.store / "refs" / "watched.parquet")
    stub.SetReference(pb.SetReferenceRequest(model="watched", version=version, table_uri="refs/watched.parquet"))
    # The retraining template the rule names (a table on the same artifact store).
    breast_cancer(p.store / "data" / "bc.parquet")
    training = training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(training_addr))
    template = training.CreateSchedule(tpb.CreateScheduleRequest(schedule=tpb.Schedule(
        description="retrain on drift", spec=tpb.TrainingJobSpec(
            dataset=tpb.Dataset(table=tpb.TableDataset(uri="data/bc.parquet"), label_column="target"),
            task=tpb.TASK_CLASSIFICATION, trainer=tpb.Trainer(family="linear"),
            registration=tpb.Registration(model_name="watched-retrained"))))).schedule

    receiver = Receiver([503, 500])  # down at first: the firing event arrives on the third attempt
    try:
        created = alerts.CreateWebhook(apb.CreateWebhookRequest(webhook=apb.Webhook(url=receiver.url)))
        assert len(created.secret) >= 32
        assert [w.url for w in alerts.ListWebhooks(apb.ListWebhooksRequest()).webhooks] == [receiver.url]
        rule = apb.AlertRule(name="watched-drift", model="watched", version=version, enabled=True, interval_seconds=1,
                             condition=apb.AlertCondition(kind=apb.CONDITION_KIND_DATASET_DRIFT),
                             training_schedule_id=template.schedule_id)
        alerts.CreateAlertRule(apb.CreateAlertRuleRequest(rule=rule))
        # Undrifted traffic: evaluated, nothing opens.
        ingest(stub, pb.IngestPredictionsRequest(records=records(
            [f"calm-{i}" for i in range(600)], features(rng, 600), classified(rng, 600), model="watched",
            version=version, endpoint="")))
        evaluated = alerts.EvaluateAlertRule(apb.EvaluateAlertRuleRequest(name="watched-drift"))
        assert not evaluated.open_alerts and evaluated.rule.HasField("last_evaluation_time")
        # Three of the four features shifted: the share drifted (at least 3/4 of the window's rows
        # come from the shift) passes 0.5 and the schedule opens an alert within a tick or two.
        ingest(stub, pb.IngestPredictionsRequest(records=records(
            [f"shift-{i}" for i in range(3000)], features(rng, 3000, {0: (2.0, 1.0), 1: (0.0, 3.0), 2: (-1.5, 1.0)}),
            classified(rng, 3000), model="watched", version=version, endpoint="")))
        firing = wait_for(lambda: alerts.ListAlerts(apb.ListAlertsRequest(rule="watched-drift")).alerts)
        assert [(a.target, a.state) for a in firing] == [(f"models/watched/versions/{version}",
                                                          apb.ALERT_STATE_FIRING)]
        assert "txn__f0" in firing[0].message and firing[0].value >= 0.5
        attempts = wait_for(lambda: receiver.requests if len(receiver.requests) >= 3 else None)
        assert len({h["X-Strata-Delivery"] for _, h, _ in attempts}) == 1  # one delivery, retried
        event = verified(created.secret, attempts[2][1], attempts[2][2])
        assert (event["event"], event["alert"]["alert_id"]) == ("firing", firing[0].alert_id)
        # The training schedule was triggered once, for this alert.
        alert = wait_for(lambda: [a for a in alerts.ListAlerts(apb.ListAlertsRequest()).alerts if a.training_job_id])[0]
        job = training.GetTrainingJob(tpb.GetTrainingJobRequest(job_id=alert.training_job_id)).job
        assert job.job_id == alert.training_job_id
        time.sleep(1.5)  # more scheduled evaluations: still one alert, still one job
        assert len(alerts.ListAlerts(apb.ListAlertsRequest(rule="watched-drift")).alerts) == 1
        assert len(training.ListTrainingJobs(tpb.ListTrainingJobsRequest()).jobs) == 1
        # Acknowledged, then resolved once the rule asks for every feature to drift.
        acked = alerts.AcknowledgeAlert(apb.AcknowledgeAlertRequest(alert_id=alert.alert_id, comment="on it")).alert
        assert acked.state == apb.ALERT_STATE_ACKNOWLEDGED
        rule.condition.threshold = 1.0
        alerts.UpdateAlertRule(apb.UpdateAlertRuleRequest(rule=rule))
        assert not alerts.EvaluateAlertRule(apb.EvaluateAlertRuleRequest(name="watched-drift")).open_alerts
        told = wait_for(lambda: [verified(created.secret, h, b)["event"] for _, h, b in receiver.requests]
                        if len(receiver.requests) >= 5 else None)
        assert told == ["firing"] * 3 + ["acknowledged", "resolved"]
        [resolved] = alerts.ListAlerts(apb.ListAlertsRequest(state=apb.ALERT_STATE_RESOLVED)).alerts
        assert resolved.alert_id == alert.alert_id and resolved.HasField("resolve_time")
        deliveries = alerts.ListWebhookDeliveries(apb.ListWebhookDeliveriesRequest(
            webhook_id=created.webhook.webhook_id)).deliveries
        assert [(d.state, d.attempts) for d in deliveries] == [(apb.DELIVERY_STATE_DELIVERED, 1)] * 2 + [
            (apb.DELIVERY_STATE_DELIVERED, 3)]  # newest first
    finally:
        receiver.close()


def test_bad_rules_and_requests_are_refused_naming_the_field(platform: tuple[Platform, str]) -> None:
    p, _ = platform
    alerts = alerts_stub(p)

    def rule(**kw: object) -> apb.AlertRule:
        base = dict(name="bad", model="m", version=1,
                    condition=apb.AlertCondition(kind=apb.CONDITION_KIND_PERFORMANCE, metric="f1", threshold=0.8))
        return apb.AlertRule(**{**base, **kw})  # type: ignore[arg-type]

    create = alerts.CreateAlertRule
    assert refused(lambda: create(apb.CreateAlertRuleRequest(rule=rule(name="")))) == "rule.name"
    assert refused(lambda: create(apb.CreateAlertRuleRequest(rule=rule(condition=apb.AlertCondition(
        kind=apb.CONDITION_KIND_PERFORMANCE, metric="auc"))))) == "rule.condition.metric"
    assert refused(lambda: create(apb.CreateAlertRuleRequest(rule=rule(condition=apb.AlertCondition(
        kind=99))))) == "rule.condition.kind"
    assert refused(lambda: create(apb.CreateAlertRuleRequest(rule=rule(condition=apb.AlertCondition(
        kind=apb.CONDITION_KIND_LATENCY_P99, threshold=20))))) == "rule.endpoint"
    assert "bad" not in [r.name for r in alerts.ListAlertRules(apb.ListAlertRulesRequest()).rules]
    create(apb.CreateAlertRuleRequest(rule=rule()))
    refused(lambda: create(apb.CreateAlertRuleRequest(rule=rule())), grpc.StatusCode.ALREADY_EXISTS)
    refused(lambda: alerts.GetAlertRule(apb.GetAlertRuleRequest(name="nope")), grpc.StatusCode.NOT_FOUND)
    refused(lambda: alerts.UpdateAlertRule(apb.UpdateAlertRuleRequest(rule=rule(name="nope"))),
            grpc.StatusCode.NOT_FOUND)
    # No rows for the rule's model yet: the evaluation gives no verdict and says why.
    evaluated = alerts.EvaluateAlertRule(apb.EvaluateAlertRuleRequest(name="bad"))
    assert not evaluated.open_alerts and "models/m/versions/1" in evaluated.rule.last_evaluation_note
    assert refused(lambda: alerts.ListAlerts(apb.ListAlertsRequest(state=7))) == "state"
    assert refused(lambda: alerts.ListAlerts(apb.ListAlertsRequest(page_token="forged"))) == "page_token"
    unknown = "0b7c3e55-7a3f-4c1e-9d2a-1f0c8e6b5a49"
    refused(lambda: alerts.AcknowledgeAlert(apb.AcknowledgeAlertRequest(alert_id=unknown)), grpc.StatusCode.NOT_FOUND)
    assert refused(lambda: alerts.AcknowledgeAlert(apb.AcknowledgeAlertRequest(alert_id="nope\x00"))) == "alert_id"
    assert refused(lambda: alerts.CreateAlertRule(apb.CreateAlertRuleRequest(rule=rule(
        name="nul", description="a\x00b")))) == "rule.description"
    for url in ("ftp://x/y", "http://", "http://exa mple.com/", "javascript:alert(1)"):
        assert refused(lambda u=url: alerts.CreateWebhook(apb.CreateWebhookRequest(
            webhook=apb.Webhook(url=u)))) == "webhook.url"
    assert refused(lambda: alerts.CreateWebhook(apb.CreateWebhookRequest(
        webhook=apb.Webhook(url="http://127.0.0.1:9/", events=[9])))) == "webhook.events[0]"
    refused(lambda: alerts.DeleteWebhook(apb.DeleteWebhookRequest(webhook_id=unknown)), grpc.StatusCode.NOT_FOUND)
    assert refused(lambda: alerts.DeleteWebhook(apb.DeleteWebhookRequest(webhook_id="nope"))) == "webhook_id"
    alerts.DeleteAlertRule(apb.DeleteAlertRuleRequest(name="bad"))
    refused(lambda: alerts.DeleteAlertRule(apb.DeleteAlertRuleRequest(name="bad")), grpc.StatusCode.NOT_FOUND)

