"""The README demo: register a small ONNX model, alias it, promote it through approval, read it
back over gRPC, over REST/JSON through Envoy and with grpcurl, then deploy it behind an endpoint
and predict over REST through Envoy; define, push and read features; then the platform's loop:
features -> training set -> Optuna search -> challenger -> approval -> production endpoint ->
predictions by entity key; printing each command (`$ ...` lines that work when pasted into a shell
after `source <home>/tokens.env`).

It finds the platform where `strata up` puts it: the same STRATA_<NAME>_PORT / _ADDR and
STRATA_GATEWAY_PORT settings, and STRATA_TLS_* for TLS."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from onnx import TensorProto, helper, numpy_helper
from strata.inference.v1 import inference_pb2 as ipb
from strata.inference.v1 import inference_pb2_grpc
from strata.registry.v1 import registry_pb2 as pb

from services.clients.registry import RegistryClient
from services.common.auth import mint_token
from services.common.client import ClientTLS, open_channel
from services.common.settings import peer_address
from services.dev_credentials import dev_secret


def build_model(path: Path) -> None:
    """A 4-feature linear scorer: y = x @ W + b."""
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((4, 1)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(1, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["score"])],
        "linear_scorer",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])], [w, b])
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


#: The header of every printed command: the shell expands $STRATA_TOKEN (from tokens.env).
AUTH_HEADER = "Authorization: Bearer $STRATA_TOKEN"


def _command(*argv: str) -> str:
    """argv as a line to paste into a shell: every word quoted, $STRATA_TOKEN left to the shell."""
    return " ".join(f'"{a}"' if "$STRATA_TOKEN" in a else shlex.quote(a) for a in argv)


def _show(*argv: str) -> None:
    print("$ " + _command(*argv))


def _grpcurl_tls() -> list[str]:
    """grpcurl's options for the platform's TLS settings (-plaintext without TLS)."""
    tls = ClientTLS.from_settings()
    if tls is None:
        return ["-plaintext"]
    args = ["-cacert", str(tls.ca_file.resolve())] if tls.ca_file else []
    if tls.cert_file and tls.key_file:
        args += ["-cert", str(tls.cert_file.resolve()), "-key", str(tls.key_file.resolve())]
    return args


def _rest(gateway: str, path: str, token: str, body: dict) -> dict:
    req = urllib.request.Request(f"{gateway}{path}", data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # the gateway's JSON error says what was wrong
        raise AssertionError(f"POST {path}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def _features_demo(home: Path, gateway: str) -> None:
    developer = mint_token(dev_secret(home), "demo-developer", ["developer"])
    view = f"demo_users_{time.strftime('%H%M%S')}"
    _step(f"feature store: define entity 'user' and view '{view}', push rows, read them online (REST)")
    _rest(gateway, "/v1/entities", developer, {"entity": {"name": "user", "join_key": "user_id",
                                                          "value_type": "VALUE_TYPE_INT64"}})
    out = _rest(gateway, "/v1/featureViews", developer, {"feature_view": {
        "name": view, "entities": ["user"], "ttl_seconds": 86400, "features": [
            {"name": "spend_7d", "dtype": "DATA_TYPE_FLOAT64", "validation": {"min": 0, "has_min": True}},
            {"name": "orders_7d", "dtype": "DATA_TYPE_INT64"}]}})
    print(f"{view}: {out['outcome']}, version {out['feature_view']['version']}")
    now_us = int(time.time() * 1e6)
    _rest(gateway, f"/v1/featureViews/{view}:push", developer, {
        "entities": {"user_id": {"int64_values": [1, 2]}}, "event_timestamps_us": [now_us, now_us],
        "features": [{"name": "spend_7d", "double_values": [120.5, 33.0]},
                     {"name": "orders_7d", "int64_values": [4, 1]}]})
    query = {"features": [f"{view}:spend_7d"], "entities": {"user_id": {"int64_values": [2, 1, 3]}}}
    _show("curl", "-H", AUTH_HEADER, "-d", json.dumps(query), f"{gateway}/v1/features:getOnline")
    got = _rest(gateway, "/v1/features:getOnline", developer, query)
    col = got["features"][0]
    print(json.dumps({"values": col["double_values"], "statuses": col["statuses"]}))
    assert col["double_values"][:2] == [33.0, 120.5] and col["statuses"][2] == "FEATURE_STATUS_NOT_FOUND"


def _get(gateway: str, path: str, token: str) -> dict:
    req = urllib.request.Request(f"{gateway}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _training_demo(home: Path, gateway: str) -> None:
    """The platform's loop on a bundled dataset (scikit-learn's breast cancer table): features ->
    a point-in-time training set -> an HPO job (MLflow runs, Optuna trials, ONNX parity, the gate)
    -> the challenger -> two-person approval to production -> a production endpoint -> predictions
    by entity key (the endpoint reads the features the model was trained on)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_breast_cancer

    store = os.environ.get("STRATA_ARTIFACT_STORE") or str(home / "artifacts")
    if "://" in store:
        print(f"\n(training demo skipped: it writes its tables into a local artifact store, and this one is {store})")
        return
    developer = mint_token(dev_secret(home), "demo-developer", ["developer"])
    approver = mint_token(dev_secret(home), "demo-approver", ["approver"])
    stamp = time.strftime("%Y%m%d_%H%M%S")
    d = load_breast_cancer()
    n = len(d.target)
    names = ["mean_radius", "mean_texture", "mean_smoothness", "mean_concavity", "worst_radius", "worst_area",
             "worst_concave_points", "worst_symmetry"]
    cols = [list(d.feature_names).index(x.replace("_", " ")) for x in names]
    us = pa.timestamp("us", tz="UTC")
    measured = int(time.time() * 1e6) - 3_600_000_000  # an hour ago: the features as of then
    view, feature_set = f"demo_tumour_{stamp}", f"demo_tumour_set_{stamp}"
    source, entities = f"sources/{view}.parquet", f"data/{view}_patients.parquet"
    for rel, table in ((source, pa.table({"patient_id": pa.array(range(n), pa.int64()),
                                          "measured_at": pa.array([measured] * n, us),
                                          **{x: d.data[:, c] for x, c in zip(names, cols, strict=True)}})),
                       (entities, pa.table({"patient_id": pa.array(range(n), pa.int64()),
                                            "event_timestamp": pa.array([measured + 1] * n, us),
                                            "target": d.target}))):
        (Path(store) / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, Path(store) / rel)

    _step(f"features: entity 'patient', view '{view}' over a Parquet source, feature set '{feature_set}' (REST)")
    _rest(gateway, "/v1/entities", developer, {"entity": {"name": "patient", "join_key": "patient_id",
                                                          "value_type": "VALUE_TYPE_INT64"}})
    _rest(gateway, "/v1/featureViews", developer, {"feature_view": {
        "name": view, "entities": ["patient"], "source": {"path": source, "timestamp_field": "measured_at"},
        "features": [{"name": x, "dtype": "DATA_TYPE_FLOAT64"} for x in names]}})
    _rest(gateway, "/v1/featureSets", developer, {"feature_set": {
        "name": feature_set, "features": [f"{view}:{x}" for x in names]}})
    print(f"{len(names)} features of {n} patients; the job's training set is read point-in-time from the source")

    model = f"demo-tumour-{stamp.replace('_', '-')}"
    _step(f"training: an 8-trial Optuna search on the feature set, tracked in MLflow, registered as {model} "
          "if it passes the gate (REST)")
    job = {"spec": {"dataset": {"features": {"feature_set": feature_set, "entity_table_uri": entities,
                                             "timestamp_column": "event_timestamp"}, "label_column": "target"},
                    "task": "TASK_CLASSIFICATION", "trainer": {"family": "hist_gradient_boosting"},
                    "hpo": {"n_trials": 8, "search_space": [
                        {"name": "learning_rate", "float_range": {"low": 0.02, "high": 0.3, "log": True}},
                        {"name": "max_iter", "int_range": {"low": 20, "high": 120}}]},
                    "registration": {"model_name": model}}}
    _show("curl", "-H", AUTH_HEADER, "-d", json.dumps(job), f"{gateway}/v1/training/jobs")
    job_id = _rest(gateway, "/v1/training/jobs", developer, job)["job"]["job_id"]
    deadline, last = time.monotonic() + 300, ""
    while True:
        j = _get(gateway, f"/v1/training/jobs/{job_id}", developer)["job"]
        p = j.get("progress", {})
        line = f"{j['state'].removeprefix('JOB_STATE_')} {p.get('stage', '')} {p.get('trials_done', 0)}/8 trials"
        if line != last:
            print(line, flush=True)
            last = line
        if j["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"):
            break
        assert time.monotonic() < deadline, f"training job {job_id} still {j['state']} after 300 s"
        time.sleep(0.5)
    assert j["state"] == "JOB_STATE_SUCCEEDED", j.get("error", j["state"])
    r = j["result"]
    print(f"held-out roc_auc {r['metrics']['roc_auc']:.4f}; ONNX parity max |onnx - native| "
          f"{r['parity']['max_abs_diff']:.2g}; gate: {r['gate']['reason']}")
    version = r["model_version"]
    lineage = _get(gateway, f"/v1/models/{model}/versions/{version}", developer)["model_version"]["lineage"]
    print(f"registered {model} v{version} (alias challenger), MLflow run {r['mlflow_run_id']} (see it at "
          f"http://127.0.0.1:5000 under `strata up`); lineage: views {lineage['feature_views']}, "
          f"dataset sha256 {lineage['dataset_hash'][:16]}...")

    _step("promote the challenger to production: requested by a developer, approved by an approver (REST)")
    promo = _rest(gateway, f"/v1/models/{model}/versions/{version}:requestPromotion", developer,
                  {"alias": "production", "reason": "passed the gate"})["promotion"]
    done = _rest(gateway, f"/v1/promotions/{promo['promotion_id']}:approve", approver, {"comment": "ok"})
    print(f"approved by {done['promotion']['decided_by']}: aliases {done['model_version']['aliases']}")

    _step("materialize the view to the online store, serve production, predict by entity key (REST)")
    for update in _rest(gateway, f"/v1/featureViews/{view}:materialize", developer, {}):
        if update.get("done"):
            print(f"materialized {update.get('rows_written', 0)} rows")
    endpoint = model.replace("demo-tumour-", "demo-t-")
    _rest(gateway, "/v1/endpoints", developer, {"endpoint": {"name": endpoint, "production": True, "policy": {
        "targets": [{"model": model, "alias": "production", "weight": 1}]}}})
    body = {"entities": [{"patient_id": 0}, {"patient_id": 19}]}
    _show("curl", "-H", AUTH_HEADER, "-d", json.dumps(body), f"{gateway}/v1/endpoints/{endpoint}:predict")
    answer = _rest(gateway, f"/v1/endpoints/{endpoint}:predict", developer, body)
    labels = [row["label"] for row in answer["rows"]]
    print(f"patients 0 and 19 -> labels {labels} (true {[int(d.target[0]), int(d.target[19])]}), "
          f"from the {len(names)} features the model was trained on, read online")
    assert len(labels) == 2
    _monitoring_demo(gateway, developer, model, version, endpoint, job["spec"], [f"{view}__{x}" for x in names],
                     d.data[:, cols], n)


def _monitoring_demo(gateway: str, developer: str, model: str, version: int, endpoint: str, spec: dict,
                     inputs: list[str], features: np.ndarray, n: int) -> None:
    """Live traffic watched: the reference from the training set the lineage names, an alert rule
    on dataset drift that retrains through a training schedule, calm traffic by entity key, then
    drift injected (six of the eight features shifted) and the alert it raises."""
    _step("monitoring: reference = the model's training set (lineage), a drift alert rule that retrains (REST)")
    ref = _rest(gateway, f"/v1/monitoring/models/{model}/versions/{version}/reference", developer,
                {"prediction_columns": {"label": "target"}})["reference"]
    print(f"reference: {ref['rows']} rows of {ref['table_uri']}, columns "
          f"{[c['name'] + ' <- ' + c['source_column'] for c in ref['columns']][:3]} ...")
    retrain = {k: v for k, v in spec.items() if k != "hpo"}  # one fit, no search: a quick retrain
    schedule = _rest(gateway, "/v1/training/schedules", developer, {"schedule": {
        "description": f"retrain {model} on drift", "spec": retrain}})["schedule"]
    rule = {"name": f"{endpoint}-drift", "endpoint": endpoint, "enabled": True, "interval_seconds": 60,
            "condition": {"kind": "CONDITION_KIND_DATASET_DRIFT"}, "window_seconds": 3600,
            "training_schedule_id": schedule["schedule_id"]}
    _rest(gateway, "/v1/monitoring/alert-rules", developer, {"rule": rule})
    print(f"alert rule {rule['name']}: dataset drift over the last hour, evaluated every minute, retrains through "
          f"schedule {schedule['schedule_id']}")

    _step("live traffic: every patient by entity key, then the same patients with drifted measurements")
    for start in range(0, n, 100):
        _rest(gateway, f"/v1/endpoints/{endpoint}:predict", developer,
              {"entities": [{"patient_id": i} for i in range(start, min(start + 100, n))]})
    _wait_logged(gateway, developer, endpoint, n)
    calm = _rest(gateway, f"/v1/monitoring/alert-rules/{rule['name']}:evaluate", developer, {})
    print(f"{n} predictions logged; rule evaluated: {len(calm.get('open_alerts', []))} open alerts")
    drifted = features.copy()
    drifted[:, :6] = drifted[:, :6] * 1.6 + drifted[:, :6].std(axis=0) * 0.5  # a recalibrated instrument
    for start in range(0, n, 100):
        _rest(gateway, f"/v1/endpoints/{endpoint}:predict", developer,
              {"rows": [dict(zip(inputs, row.tolist(), strict=True)) for row in drifted[start:start + 100]]})
    _wait_logged(gateway, developer, endpoint, 2 * n)
    fired = _rest(gateway, f"/v1/monitoring/alert-rules/{rule['name']}:evaluate", developer, {})
    assert fired.get("open_alerts"), f"no alert after the injected drift: {fired['rule'].get('last_evaluation_note')}"
    alert = fired["open_alerts"][0]
    print(f"ALERT {alert['alert_id']} on {alert['target']}: {alert['message']}")
    job = alert.get("training_job_id") or "(trigger failed: " + alert.get("trigger_error", "") + ")"
    print(f"retraining job submitted by the alert: {job}")
    _show("curl", "-H", AUTH_HEADER, "-d", "{}", f"{gateway}/v1/monitoring/alert-rules/{rule['name']}:evaluate")
    _show("curl", "-H", AUTH_HEADER, f"{gateway}/v1/monitoring/alerts")
    _show("curl", "-H", AUTH_HEADER, "-o", "drift.html", f"{gateway}/v1/monitoring/drift:html?endpoint={endpoint}")


def _wait_logged(gateway: str, token: str, endpoint: str, rows: int, timeout: float = 30) -> None:
    """Until the inference service's prediction log has delivered `rows` predictions of the endpoint."""
    deadline, got = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        try:
            report = _get(gateway, f"/v1/monitoring/performance?endpoint={endpoint}", token)
            got = sum(int(v["rows"]) for v in report.get("versions", []))
        except urllib.error.HTTPError as e:
            if e.code != 404:  # (404: nothing of the endpoint has arrived yet)
                raise
        if got >= rows:
            return
        time.sleep(0.3)
    raise AssertionError(f"{got} of {rows} predictions of {endpoint} reached monitoring in {timeout} s")


def _weights(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import onnx
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return inits["W"], inits["b"]


def _step(title: str) -> None:
    print(f"\n== {title}")


def run_demo(home: Path, *, gateway: str | None = None, registry: str | None = None,
             inference: str | None = None) -> int:
    """Run the demo against a running platform; addresses default to the settings `strata up`
    uses (STRATA_<NAME>_ADDR / _PORT, STRATA_GATEWAY_PORT)."""
    gateway = gateway or f"http://{peer_address('gateway')}"
    registry = registry or peer_address("registry")
    inference = inference or peer_address("inference")
    home = home.resolve()
    print(f"The $ lines repeat each step from a shell; first: source {shlex.quote(str(home / 'tokens.env'))}")
    try:
        _demo(home, gateway, registry, inference)
        _features_demo(home, gateway)
        _training_demo(home, gateway)
    except (grpc.RpcError, OSError, AssertionError, KeyError, subprocess.CalledProcessError) as e:
        detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
        if isinstance(e, subprocess.CalledProcessError):
            detail += f"\n{e.stderr or ''}"
        print(f"\ndemo FAILED: {detail}", file=sys.stderr, flush=True)
        return 1
    print("\ndemo OK", flush=True)
    return 0


def _demo(home: Path, gateway: str, registry: str, inference: str) -> None:
    secret = dev_secret(home)
    developer = mint_token(secret, "demo-developer", ["developer"])
    approver = mint_token(secret, "demo-approver", ["approver"])
    name = f"demo-scorer-{time.strftime('%Y%m%d-%H%M%S')}"

    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "scorer.onnx"
        build_model(model_file)
        digest = hashlib.sha256(model_file.read_bytes()).hexdigest()

        _step(f"register {model_file.name} as {name} (gRPC, developer)")
        with RegistryClient(registry, developer) as dev:
            v = dev.register_onnx(name, model_file, create_model=True, metrics={"auc": 0.91},
                                  description="demo linear scorer")
            print(f"version {v.version}: {pb.ModelVersionStatus.Name(v.status)}, sha256 {v.artifact.sha256}")
            print("signature: " + ", ".join(f"{t.name}{list(t.shape)}" for t in v.signature.inputs) + " -> "
                  + ", ".join(f"{t.name}{list(t.shape)}" for t in v.signature.outputs))
            assert v.artifact.sha256 == digest
            dev.stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="challenger", version=v.version))
            print("alias challenger -> v1")
            promo = dev.stub.RequestPromotion(pb.RequestPromotionRequest(
                name=name, version=v.version, alias="production", reason="demo")).promotion
            print(f"promotion {promo.promotion_id} requested by {promo.requested_by}")
            try:
                dev.stub.ApprovePromotion(pb.ApprovePromotionRequest(promotion_id=promo.promotion_id))
                raise AssertionError("a developer approved a promotion")
            except grpc.RpcError as e:
                print(f"approval by the requester refused: {e.code().name}")
        with RegistryClient(registry, approver) as appr:
            done = appr.stub.ApprovePromotion(pb.ApprovePromotionRequest(
                promotion_id=promo.promotion_id, comment="looks good"))
            print(f"approved by {done.promotion.decided_by}: aliases {list(done.model_version.aliases)}, "
                  f"stage {pb.Stage.Name(done.model_version.stage)}")

        _step("read it back over gRPC (GetModelVersion)")
        with RegistryClient(registry, developer) as dev:
            got = dev.resolve(name, alias="production")
            print(f"{got.name} v{got.version} aliases={list(got.aliases)} sha256={got.artifact.sha256}")

        _step("read it back over REST/JSON through Envoy")
        url = f"{gateway}/v1/models/{name}/versions/{v.version}"
        _show("curl", "-H", AUTH_HEADER, url)
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {developer}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.loads(r.read())["model_version"]
        print(json.dumps({k: body[k] for k in ("name", "version", "status", "stage", "aliases", "artifact")}, indent=2))
        art = f"{url}/artifact"
        _show("curl", "-H", AUTH_HEADER, art, "-o", "model.onnx")
        with urllib.request.urlopen(urllib.request.Request(art, headers={"Authorization": f"Bearer {developer}"}),
                                    timeout=30) as r:
            downloaded = hashlib.sha256(r.read()).hexdigest()
        assert downloaded == digest, f"REST download sha256 {downloaded} != {digest}"
        print(f"downloaded over REST, sha256 matches: {downloaded}")

        _step("read it back with grpcurl (server reflection)")
        grpcurl = str(Path(sys.executable).parent / "grpcurl")
        # The bare name where the user's shell finds this same grpcurl, else the full path.
        shown_grpcurl = "grpcurl" if shutil.which("grpcurl") == grpcurl else grpcurl
        payload = json.dumps({"name": name, "version": v.version})
        method = "strata.registry.v1.RegistryService/GetModelVersion"
        cmd = [grpcurl, *_grpcurl_tls(), "-H", f"authorization: Bearer {developer}", "-d", payload, registry, method]
        _show(shown_grpcurl, *_grpcurl_tls(), "-H", "authorization: Bearer $STRATA_TOKEN", "-d", payload, registry,
              method)
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout
        reply = json.loads(out)
        # Field names as the descriptors grpcurl got say: proto names via reflection, camelCase from a protoset.
        assert (reply.get("model_version") or reply["modelVersion"])["artifact"]["sha256"] == digest
        print(out.strip())

        _step("deploy it: endpoint -> the production alias (gRPC, developer)")
        endpoint = name.replace("demo-scorer-", "demo-")
        raw, channel = open_channel(inference, developer)
        with raw:
            ep = inference_pb2_grpc.InferenceServiceStub(channel).CreateEndpoint(ipb.CreateEndpointRequest(
                endpoint=ipb.Endpoint(name=endpoint, policy=ipb.TrafficPolicy(
                    targets=[ipb.Target(model=name, alias="production", weight=1)])))).endpoint
        print(f"endpoint {ep.name} revision {ep.revision}: {ep.policy.targets[0].model} "
              f"v{ep.policy.targets[0].version} loaded, sha256 verified, warmed")

        _step("predict over REST/JSON through Envoy")
        rows = [{"features": [0.5, -1.0, 2.0, 0.25]}, {"features": [1.0, 1.0, 1.0, 1.0]}]
        url = f"{gateway}/v1/endpoints/{endpoint}:predict"
        _show("curl", "-H", AUTH_HEADER, "-d", json.dumps({"rows": rows}), url)
        req = urllib.request.Request(url, data=json.dumps({"rows": rows}).encode(), method="POST", headers={
            "Authorization": f"Bearer {developer}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.loads(r.read())
        print(json.dumps({k: answer[k] for k in ("model", "version", "policy_revision", "rows")}, indent=2))
        w, b = _weights(model_file)
        want = np.array([row["features"] for row in rows], np.float32) @ w + b
        got = np.array([row["score"] for row in answer["rows"]], np.float32)
        assert np.allclose(got, want, atol=1e-5), f"REST predictions {got} != {want}"
        print("predictions match x @ W + b computed from the model's own weights")
