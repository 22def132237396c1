"""deploy/prometheus and deploy/grafana against a real Prometheus scraping a real platform.

A registry, the feature service, the training service (no workers), the monitoring service and
the inference service (two serving processes, its prediction log sent to monitoring) run on
loopback. The test serves two endpoints (a classifier whose traffic is shifted away from its
reference, and a model that fails on some inputs), pushes and reads features, computes a drift
report and lets a monitoring alert rule open an alert. Then Prometheus (Debian's `prometheus`)
runs with deploy/prometheus/prometheus.yml rewritten for the test's ports, a 1 s scrape and
evaluation interval, and a copy of alerts.yml whose `for:` are 0 s, and the test checks:

(a) every scrape target is up;
(b) every PromQL expression of every panel of every dashboard is accepted by Prometheus, the
    ones about the generated traffic return data, and the counter panel's values equal the
    requests made; the per-process CPU panel shows both serving processes of inference;
(c) the rules of alerts.yml load, the endpoint error-ratio rule fires for the failing endpoint,
    the drift rule for the drifted one, and `up == 0` fires once a service is stopped.

Without a `prometheus` binary the test is skipped, except in CI (CI=true), where it fails:
.ci/run installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import yaml
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as fpb
from strata.features.v1 import features_pb2_grpc
from strata.inference.v1 import inference_pb2 as ipb
from strata.inference.v1 import inference_pb2_grpc
from strata.monitoring.v1 import alerts_pb2 as apb
from strata.monitoring.v1 import alerts_pb2_grpc
from strata.monitoring.v1 import monitoring_pb2 as mpb
from strata.monitoring.v1 import monitoring_pb2_grpc

from services.clients.registry import RegistryClient
from tests.inference import models
from tests.monitoring.conftest import FEATURES, classifier_onnx
from tests.processes import ROOT, free_port, start_service, stop_process

DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
# The training service is left out of the live platform: its start (MLflow's database) takes
# longer than this test's budget on a loaded machine. Its panels are checked for syntax, and its
# metrics by test_training_metrics_come_from_the_job_table below.
SERVICES = ("registry", "features", "inference", "monitoring")

OK_CALLS, ROWS_PER_CALL = 60, 5          # endpoint "obs": drifted traffic, all served
FLAKY_OK, FLAKY_ERRORS = 20, 10          # endpoint "obs-flaky": the model fails on 10 calls
MISSING_CALLS = 3                        # Predict on an endpoint that does not exist: NOT_FOUND
PUSHES, READS = 4, 25

# Panels that may answer nothing here, with the reason; every other panel must return data.
MAY_BE_EMPTY = {
    "Shadow runs skipped per second": "no endpoint has shadows",
    "Age of the newest materialization's end": "nothing is materialized",
    "Rows materialized per second": "nothing is materialized",
}
TRAINING = "training"  # every panel of training.json may be empty: no training service runs here


def _prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the prometheus binary is not installed; .ci/run installs Debian's `prometheus`")
        pytest.skip("no prometheus binary on PATH (Debian: apt-get install prometheus; CI installs it)")
    return path


@dataclass
class Platform:
    home: Path
    ports: dict[str, int]                       # service -> gRPC port
    metrics: dict[str, int]                     # service -> metrics port
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    _prometheus()
    home = tmp_path_factory.mktemp("observability")
    p = Platform(home, {s: free_port() for s in SERVICES}, {s: free_port() for s in SERVICES})
    env = {"STRATA_AUTH": "disabled", **{f"STRATA_{s.upper()}_ADDR": p.addr(s) for s in SERVICES},
           **{f"STRATA_{s.upper()}_METRICS_PORT": str(p.metrics[s]) for s in SERVICES}}
    extra = {
        "registry": {},
        "features": {"STRATA_FEATURES_WORKERS": "1"},
        "monitoring": {"STRATA_MONITORING_COMPACT_SECONDS": "0.5", "STRATA_MONITORING_METRICS_URLS": "none"},
        "inference": {"STRATA_INFERENCE_WORKERS": "2", "STRATA_INFERENCE_POLL_SECONDS": "0.05",
                      "STRATA_INFERENCE_MONITORING": p.addr("monitoring")},
    }

    def start(name: str) -> None:
        p.procs[name] = start_service(name, home, p.ports[name], {**env, **extra[name]})

    try:
        start("registry")
        with ThreadPoolExecutor(4) as pool:
            for f in [pool.submit(start, s) for s in SERVICES if s != "registry"]:
                f.result()
        yield p
    finally:
        for proc in reversed(list(p.procs.values())):
            stop_process(proc)


@dataclass
class Traffic:
    home: Path
    ok_rows: int = 0


def _predict(stub: inference_pb2_grpc.InferenceServiceStub, endpoint: str, inputs: dict[str, np.ndarray]) -> None:
    stub.Predict(ipb.PredictRequest(endpoint=endpoint, inputs=[
        ipb.Tensor(name=k, shape=list(v.shape), raw=v.tobytes()) for k, v in inputs.items()]), timeout=30)


@pytest.fixture(scope="module")
def traffic(platform: Platform, prometheus: Prometheus) -> Traffic:
    home, rng = platform.home, np.random.default_rng(7)
    with RegistryClient(platform.addr("registry")) as client:
        for name, blob in (("obs-clf", classifier_onnx()), ("obs-flaky", models.fails_when_large())):
            path = home / f"{name}.onnx"
            path.write_bytes(blob)
            client.register_onnx(name, path, create_model=True)
    # The reference of obs-clf: standard normal features; the served traffic is shifted by 2.
    (home / "artifacts" / "refs").mkdir(parents=True, exist_ok=True)
    ref = {f: rng.standard_normal(2000) for f in FEATURES}
    pq.write_table(pa.table({**ref, "label": (ref[FEATURES[0]] > 0).astype(np.int64)}),
                   home / "artifacts" / "refs" / "obs.parquet")
    mon = grpc.insecure_channel(platform.addr("monitoring"))
    monitoring = monitoring_pb2_grpc.MonitoringServiceStub(mon)
    monitoring.SetReference(mpb.SetReferenceRequest(model="obs-clf", version=1, table_uri="refs/obs.parquet"))
    alerts_pb2_grpc.AlertServiceStub(mon).CreateAlertRule(apb.CreateAlertRuleRequest(rule=apb.AlertRule(
        name="obs-drift", model="obs-clf", version=1, enabled=True, interval_seconds=1,
        condition=apb.AlertCondition(kind=apb.CONDITION_KIND_DATASET_DRIFT))))

    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(platform.addr("inference")))
    for name, model in (("obs", "obs-clf"), ("obs-flaky", "obs-flaky")):
        stub.CreateEndpoint(ipb.CreateEndpointRequest(endpoint=ipb.Endpoint(name=name, policy=ipb.TrafficPolicy(
            targets=[ipb.Target(model=model, version=1, weight=1)]))))
    def flaky(i: int) -> None:
        x = rng.random((1, 32)).astype(np.float32)
        x[0, 0] = 20.0 if i % 3 == 2 else 1.0   # >= 10: the model's Gather fails
        try:
            _predict(stub, "obs-flaky", {"input": x})
            assert i % 3 != 2
        except grpc.RpcError as e:
            assert i % 3 == 2, e

    def obs() -> None:
        _predict(stub, "obs", {f: (rng.standard_normal((ROWS_PER_CALL, 1)) + 2).astype(np.float32) for f in FEATURES})

    # A first call of each endpoint creates its counters (ok and error, at 0 for errors); once
    # Prometheus holds them, rate() sees every later request (it counts no increase before a
    # series' first sample).
    obs()
    flaky(0)
    _wait(lambda: prometheus.query('strata_inference_predictions_total{endpoint="obs-flaky", outcome="error"}'), 15,
          "Prometheus to scrape the counters")
    for _ in range(OK_CALLS - 1):  # one call at a time: no batch mixes a failing request with others
        obs()
    for i in range(1, FLAKY_OK + FLAKY_ERRORS):
        flaky(i)
    for _ in range(MISSING_CALLS):
        with pytest.raises(grpc.RpcError) as err:
            _predict(stub, "no-such-endpoint", {"input": np.zeros((1, 32), np.float32)})
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    features = features_pb2_grpc.FeatureServiceStub(grpc.insecure_channel(platform.addr("features")))
    features.ApplyEntity(fpb.ApplyEntityRequest(entity=fpb.Entity(name="user", join_key="user_id",
                                                                  value_type=fpb.VALUE_TYPE_INT64)))
    features.ApplyFeatureView(fpb.ApplyFeatureViewRequest(feature_view=fpb.FeatureView(
        name="obs_users", entities=["user"], features=[fpb.Feature(name="spend", dtype=types_pb2.DATA_TYPE_FLOAT64)])))
    for i in range(PUSHES):
        features.PushFeatures(fpb.PushFeaturesRequest(
            view="obs_users", entities={"user_id": fpb.EntityColumn(int64_values=[1, 2, 3])},
            event_timestamps_us=[int((time.time() - 30 + i) * 1e6)] * 3,
            features=[fpb.FeatureValues(name="spend", double_values=[1.0, 2.0, 3.0])]))
    for _ in range(READS):
        features.GetOnlineFeatures(fpb.GetOnlineFeaturesRequest(
            features=["obs_users:spend"], entities={"user_id": fpb.EntityColumn(int64_values=[1, 2, 9])}))

    with pytest.raises(grpc.RpcError) as err:  # a refused read, for the error panels
        features.GetOnlineFeatures(fpb.GetOnlineFeaturesRequest(
            features=["obs_users:nope"], entities={"user_id": fpb.EntityColumn(int64_values=[1])}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # The drift report, once monitoring has every row of "obs" (delivered, then compacted).
    want = OK_CALLS * ROWS_PER_CALL
    report = _wait(lambda: [v for v in monitoring.GetDriftReport(mpb.GetDriftReportRequest(endpoint="obs")).versions
                            if v.rows == want], 30, "monitoring to hold every prediction of 'obs'")
    assert report[0].dataset_drifted
    return Traffic(home, want)


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (grpc.RpcError, requests.RequestException, KeyError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


# -- Prometheus ----------------------------------------------------------------------------------

def _test_rules(src: Path, out: Path) -> None:
    """alerts.yml with every `for:` at 0 s, so that a rule fires at its first true evaluation."""
    rules = yaml.safe_load(src.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["for"] = "0s"
    out.write_text(yaml.safe_dump(rules, sort_keys=False))


def _test_config(platform: Platform, prom_port: int, rules: Path, out: Path) -> dict:
    """deploy/prometheus/prometheus.yml with the test's ports and a 1 s scrape and evaluation."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    assert set(jobs) == {f"strata-{s}" for s in (*SERVICES, "training")} | {"prometheus"}
    config["scrape_configs"] = [c for c in config["scrape_configs"] if c["job_name"] != "strata-training"]
    for s in SERVICES:
        jobs[f"strata-{s}"]["static_configs"] = [{"targets": [f"127.0.0.1:{platform.metrics[s]}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> Any:
        r = requests.get(f"{self.url}{path}", params=params, timeout=10)
        body = r.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def alerts(self, name: str, state: str = "firing") -> list[dict]:
        return [a for a in self.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == name and a["state"] == state]


@pytest.fixture(scope="module")
def prometheus(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = _prometheus()
    d = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    _test_rules(DEPLOY / "prometheus" / "alerts.yml", d / "alerts.yml")
    _test_config(platform, port, d / "alerts.yml", d / "prometheus.yml")
    promtool = shutil.which("promtool")
    if promtool:
        subprocess.run([promtool, "check", "config", str(d / "prometheus.yml")], check=True, capture_output=True)
    log = d / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        _wait(lambda: proc.poll() is None and requests.get(f"{prom.url}/-/ready", timeout=2).ok, 30,
              f"Prometheus to be ready:\n{log.read_text()[-2000:]}")
        yield prom
    finally:
        stop_process(proc)


# -- the checks ----------------------------------------------------------------------------------

def _promql(expr: str) -> str:
    """A panel's expression as Grafana sends it, the variables at "All"."""
    expr = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", "5m")
    return re.sub(r"\$\{?(endpoint|model|version|view)\}?", ".*", expr)


def _panels() -> list[tuple[str, dict]]:
    out = []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        out += [(path.stem, p) for p in dash["panels"] if p["type"] != "row"]
    return out


def test_dashboards_are_grafana_json_on_the_datasource_variable() -> None:
    assert {p.stem for p in DASHBOARDS} == {"serving", "features", "training", "monitoring"}
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        assert dash["schemaVersion"] >= 36 and dash["uid"] == f"strata-{path.stem}"
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
        for p in dash["panels"]:
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p["targets"] and all(t["expr"] and t["datasource"] == p["datasource"] for t in p["targets"])
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for name, v in variables.items():
            if name != "datasource":
                assert v["datasource"]["uid"] == "${datasource}" and v["query"]["query"].startswith("label_values(")
    for provisioning in (DEPLOY / "grafana" / "provisioning").glob("*/*.yaml"):
        assert yaml.safe_load(provisioning.read_text())["apiVersion"] == 1


def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        _prometheus()  # fails in CI, skips elsewhere
        pytest.skip("no promtool on PATH")
    for args in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_training_metrics_come_from_the_job_table(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from prometheus_client import REGISTRY

    from services.common.db import Database
    from services.training import prom_metrics, tables
    from services.training.app import MIGRATIONS

    db = Database(f"sqlite:///{tmp_path / 'training.db'}")
    db.migrate(MIGRATIONS)
    now = datetime.now(UTC)
    with db.session() as c:
        for i, (state, done, pruned, failed) in enumerate([(2, 3, 1, 0), (4, 2, 0, 2), (3, 8, 0, 0)]):
            c.execute(tables.jobs.insert().values(
                job_id=f"j{i}", spec={}, state=state, created_by="t", create_time=now, update_time=now,
                progress={"trials_total": 8, "trials_done": done, "trials_pruned": pruned, "trials_failed": failed}))
    prom_metrics.watch(db)
    jobs = {s: REGISTRY.get_sample_value("strata_training_jobs", {"state": s})
            for s in ("queued", "running", "succeeded", "failed", "cancelled")}
    assert jobs == {"queued": 0, "running": 1, "succeeded": 1, "failed": 1, "cancelled": 0}
    assert {o: REGISTRY.get_sample_value("strata_training_trials", {"outcome": o}) for o in ("done", "pruned", "failed")} \
        == {"done": 13, "pruned": 1, "failed": 2}
    assert REGISTRY.get_sample_value("strata_training_running_trials_planned") == 8
    db.dispose()


def test_prometheus_scrapes_the_platform_and_the_dashboards_and_alerts_work(
        platform: Platform, traffic: Traffic, prometheus: Prometheus) -> None:
    prom = prometheus
    # (a) every target up.
    jobs = {f"strata-{s}" for s in SERVICES} | {"prometheus"}
    targets = _wait(lambda: (lambda t: t if {x["labels"]["job"] for x in t if x["health"] == "up"} == jobs else None)(
        prom.get("/api/v1/targets")["activeTargets"]), 20, "every target to be up")
    assert len(targets) == len(jobs)

    # (c, first part) the rules load, and the error-ratio and drift rules fire on the traffic.
    names = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    loaded = {r["name"] for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]}
    assert loaded == names and all(r["health"] != "err" for g in prom.get("/api/v1/rules")["groups"]
                                   for r in g["rules"])
    firing = _wait(lambda: prom.alerts("StrataEndpointErrorRatio"), 20, "the error-ratio alert")
    assert {(a["labels"]["endpoint"], a["labels"]["model"]) for a in firing} == {("obs-flaky", "obs-flaky")}
    # A third of the calls fail; the value is rate()'s, extrapolated over samples taken while the
    # calls were being made, so near a third rather than exactly.
    assert 0.2 < float(firing[0]["value"]) < 0.5
    def labelled(a: dict) -> tuple[str, str, str]:
        return a["labels"].get("endpoint", ""), a["labels"]["model"], a["labels"]["version"]

    drift = _wait(lambda: (lambda found: found if ("obs", "obs-clf", "1") in {labelled(a) for a in found} else None)(
        prom.alerts("StrataDatasetDrift")), 20, "the drift alert of the report on endpoint obs")
    # The drift report asked for the endpoint, and the drift rule's evaluations of the model version
    # (endpoint "", a label Prometheus leaves out), set the same gauges.
    assert {labelled(a) for a in drift} <= {("obs", "obs-clf", "1"), ("", "obs-clf", "1")}
    _wait(lambda: prom.alerts("StrataMonitoringAlertOpen"), 15, "the open monitoring alert")

    # (b) every expression of every panel: accepted, and data where the traffic made some.
    empty = []
    for dash, panel in _panels():
        for target in panel["targets"]:
            expr = _promql(target["expr"])
            try:
                got = _wait(lambda e=expr: prom.query(e), 1.5, expr) \
                    if panel["title"] not in MAY_BE_EMPTY and dash != TRAINING else prom.query(expr)
            except AssertionError:
                got = []
            if not got and panel["title"] not in MAY_BE_EMPTY and dash != TRAINING:
                empty.append((dash, panel["title"]))
    assert not empty, (empty, [r["metric"] for r in prom.query("count by (job, service, method) (strata_grpc_requests_total)")])

    def served() -> dict[tuple[str, str], float]:
        (panel,) = [p for d, p in _panels() if p["title"].startswith("Predictions served")]
        return {(r["metric"]["endpoint"], r["metric"]["outcome"]): float(r["value"][1])
                for r in prom.query(_promql(panel["targets"][0]["expr"]))}

    want = {("obs", "ok"): OK_CALLS, ("obs", "error"): 0, ("obs-flaky", "ok"): FLAKY_OK,
            ("obs-flaky", "error"): FLAKY_ERRORS}
    assert _wait(lambda: served() == want, 10, "the counter panel") and served() == want

    def values(title: str, key: str) -> dict[str, float]:
        (panel,) = [p for d, p in _panels() if p["title"] == title]
        return {r["metric"].get(key, ""): float(r["value"][1]) for r in prom.query(_promql(panel["targets"][0]["expr"]))}

    assert values("Prediction rows stored", "endpoint")["obs"] == traffic.ok_rows
    assert values("Dataset drifted", "endpoint") == {"obs": 1.0, "": 1.0}  # the report on "obs", the rule on the version
    assert values("Open alerts per rule (monitoring alert rules)", "rule") == {"obs-drift": 1.0}
    assert values("Rows pushed per second", "view").keys() == {"obs_users"}
    assert values("Online reads per second by code", "code").keys() == {"OK", "INVALID_ARGUMENT"}
    (reads,) = prom.query('strata_grpc_requests_total{service="features", method="GetOnlineFeatures", code="OK"}')
    assert float(reads["value"][1]) == READS
    cpu = prom.query('strata_process_cpu_seconds{service="inference"}')
    assert len({r["metric"]["pid"] for r in cpu}) == 2 and {r["metric"]["worker"] for r in cpu} == {"0", "1"}
    memory = {r["metric"]["service"] for r in prom.query("strata_process_resident_memory_bytes > 0")}
    assert memory == set(SERVICES)

    # (c, second part) a service stops: `up == 0` fires for it.
    stop_process(platform.procs["features"])
    down = _wait(lambda: prom.alerts("StrataServiceDown"), 20, "the service-down alert")
    assert {a["labels"]["job"] for a in down} == {"strata-features"}
