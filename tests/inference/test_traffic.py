"""Traffic policies through the platform's own Predict API, against real processes: weights,
stickiness, shadows, blue/green and rollback under concurrent load (with one and with two
serving processes), automatic canary rollback on errors and on latency."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from strata.inference.v1 import inference_pb2 as pb

from services.inference.predlog_format import read_records
from tests.inference.conftest import Inference, Registry, policy, start_inference
from tests.processes import stop_process

ROWS = np.random.default_rng(7).standard_normal((4, 32)).astype(np.float32)


def _request(endpoint: str, x: np.ndarray = ROWS, key: str = "", rid: str = "") -> pb.PredictRequest:
    return pb.PredictRequest(endpoint=endpoint, routing_key=key, request_id=rid, inputs=[
        pb.Tensor(name="input", shape=list(x.shape), raw=x.tobytes())])


def _output(resp: pb.PredictResponse) -> np.ndarray:
    t = resp.outputs[0]
    return np.frombuffer(t.raw, np.float32).reshape(list(t.shape))


@pytest.fixture(scope="module")
def expected(registry: Registry) -> dict[tuple[str, int], np.ndarray]:
    """What each version answers for ROWS, computed by onnxruntime directly."""
    return {key: ort.InferenceSession(blob).run(None, {"input": ROWS})[0]
            for key, blob in registry.artifacts.items() if key[0] == "mlp"}


def _create(stub, name: str, pol: pb.TrafficPolicy) -> pb.Endpoint:  # noqa: ANN001
    return stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(name=name, policy=pol))).endpoint


def test_weights_split_traffic_within_tolerance(inference: Inference) -> None:
    stub = inference.stub()
    _create(stub, "ab", policy(("mlp", 1, 80), ("mlp", 2, 20)))
    with ThreadPoolExecutor(8) as pool:
        versions = Counter(r.version for r in pool.map(lambda _: stub.Predict(_request("ab")), range(2000)))
    assert set(versions) == {1, 2}
    assert abs(versions[1] / 2000 - 0.8) < 0.04, versions


def test_sticky_routing_keeps_a_key_on_its_version(inference: Inference) -> None:
    stub = inference.stub()
    _create(stub, "sticky", policy(("mlp", 1, 50), ("mlp", 2, 50), sticky=True))
    seen: dict[str, set[int]] = {}
    for user in range(60):
        for _ in range(4):
            seen.setdefault(f"user-{user}", set()).add(stub.Predict(_request("sticky", key=f"user-{user}")).version)
    assert all(len(v) == 1 for v in seen.values()), seen
    assert {next(iter(v)) for v in seen.values()} == {1, 2}  # keys spread over both versions


def test_shadow_results_are_logged_and_never_returned(inference: Inference, expected: dict) -> None:
    stub = inference.stub()
    _create(stub, "shadowed", pb.TrafficPolicy(targets=[pb.Target(model="mlp", version=1, weight=1)],
                                               shadows=[pb.Target(model="mlp", version=3)]))
    rids = [f"shadow-{i}" for i in range(20)]
    for rid in rids:
        resp = stub.Predict(_request("shadowed", rid=rid))
        assert (resp.model, resp.version) == ("mlp", 1)
        np.testing.assert_allclose(_output(resp), expected[("mlp", 1)], rtol=1e-5, atol=1e-5)
    deadline = time.time() + 10
    while time.time() < deadline:
        recs = [r for f in (inference.home / "inference" / "predictions").glob("*.binpb") for r in read_records(f)
                if r.endpoint == "shadowed"]
        shadow = {r.request_id: r for r in recs if r.shadow}
        if set(rids) <= shadow.keys():
            break
        time.sleep(0.2)
    assert set(rids) <= shadow.keys()
    rec = shadow[rids[0]]
    assert (rec.model, rec.version) == ("mlp", 3)
    out = np.frombuffer(rec.outputs[0].raw, np.float32).reshape(list(rec.outputs[0].shape))
    np.testing.assert_allclose(out, expected[("mlp", 3)], rtol=1e-5, atol=1e-5)
    served = {r.request_id for r in recs if not r.shadow}
    assert set(rids) <= served  # the answers are logged too, with shadow=False


def _hammer(stub, endpoint: str, stop: threading.Event, out: list, errors: list) -> None:  # noqa: ANN001
    while not stop.is_set():
        try:
            r = stub.Predict(_request(endpoint))
            out.append((time.monotonic(), r.policy_revision, r.version, _output(r)))
        except grpc.RpcError as e:
            errors.append(e)


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-processes"])
def serving(request: pytest.FixtureRequest, inference: Inference, registry: Registry,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    if request.param == 1:
        yield inference
        return
    srv = start_inference(registry, tmp_path_factory.mktemp("inference-2w"), workers=2)
    try:
        yield srv
    finally:
        stop_process(srv.proc)


def test_blue_green_switch_and_rollback_are_atomic_under_load(serving: Inference, expected: dict) -> None:
    stub = serving.stub()
    name = "bluegreen"
    _create(stub, name, policy(("mlp", 1, 1)))
    stop, results, errors = threading.Event(), [], []
    threads = [threading.Thread(target=_hammer, args=(serving.stub(), name, stop, results, errors)) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    green = stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint=name, policy=policy(("mlp", 2, 1)))).endpoint
    switched = time.monotonic()
    time.sleep(0.5)
    back = stub.RollbackTrafficPolicy(pb.RollbackTrafficPolicyRequest(endpoint=name)).endpoint
    rolled = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert (green.revision, back.revision) == (2, 3)
    by_revision = {1: 1, 2: 2, 3: 1}
    for at, revision, version, out in results:
        # Each answer comes whole from the version its revision names (never a mix).
        assert version == by_revision[revision]
        np.testing.assert_allclose(out, expected[("mlp", version)], rtol=1e-5, atol=1e-5)
        # Once a change has returned, no process answers with an older revision.
        if at > rolled + 0.05:
            assert revision == 3
        elif at > switched + 0.05:
            assert revision >= 2
    assert {r for _, r, _, _ in results} == {1, 2, 3}
    revs = stub.ListPolicyRevisions(pb.ListPolicyRevisionsRequest(endpoint=name)).revisions
    assert [r.revision for r in revs] == [3, 2, 1]
    assert revs[0].reason.startswith("rollback")


def test_set_policy_guards_against_concurrent_changes(inference: Inference) -> None:
    stub = inference.stub()
    ep = _create(stub, "guarded", policy(("mlp", 1, 1)))
    stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="guarded", policy=policy(("mlp", 2, 1)),
                                                     expected_revision=ep.revision))
    with pytest.raises(grpc.RpcError) as err:
        stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="guarded", policy=policy(("mlp", 3, 1)),
                                                         expected_revision=ep.revision))
    assert err.value.code() == grpc.StatusCode.ABORTED


def _wait_for_revision(stub, name: str, revision: int, timeout: float = 20) -> pb.Endpoint:  # noqa: ANN001
    deadline = time.time() + timeout
    while time.time() < deadline:
        ep = stub.GetEndpoint(pb.GetEndpointRequest(name=name)).endpoint
        if ep.revision >= revision:
            return ep
        time.sleep(0.2)
    raise AssertionError(f"{name} never reached revision {revision}")


def test_canary_is_rolled_back_when_its_error_rate_exceeds_the_limit(inference: Inference) -> None:
    stub = inference.stub()
    _create(stub, "canary-errors", policy(("mlp", 1, 1)))
    canary = policy(("mlp", 1, 50), ("flaky", 1, 50),
                    canary=pb.CanaryLimits(target_index=1, max_error_rate=0.2, min_requests=20))
    stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="canary-errors", policy=canary))
    bad = np.full((1, 32), 50, np.float32)  # the flaky version fails on these rows
    failures = 0
    for _ in range(200):
        try:
            stub.Predict(_request("canary-errors", x=bad))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INTERNAL and "flaky/versions/1 failed" in e.details()
            failures += 1
        if stub.GetEndpoint(pb.GetEndpointRequest(name="canary-errors")).endpoint.revision == 3:
            break
        time.sleep(0.01)
    assert failures >= 1
    ep = _wait_for_revision(stub, "canary-errors", 3)
    assert [(t.model, t.version) for t in ep.policy.targets] == [("mlp", 1)]
    rev = stub.ListPolicyRevisions(pb.ListPolicyRevisionsRequest(endpoint="canary-errors")).revisions[0]
    assert rev.created_by == "strata-canary-guard" and "error rate" in rev.reason, rev.reason
    # After the rollback every request is served by the stable version.
    assert {stub.Predict(_request("canary-errors", x=bad)).version for _ in range(20)} == {1}


def test_canary_is_rolled_back_when_its_p99_exceeds_the_limit(inference: Inference) -> None:
    stub = inference.stub()
    _create(stub, "canary-slow", policy(("mlp", 1, 1)))
    canary = policy(("mlp", 1, 50), ("slow", 1, 50),
                    canary=pb.CanaryLimits(target_index=1, max_p99_ms=1.0, min_requests=10))
    stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="canary-slow", policy=canary))
    for _ in range(300):
        stub.Predict(_request("canary-slow", x=np.ones((32, 32), np.float32)))
        if stub.GetEndpoint(pb.GetEndpointRequest(name="canary-slow")).endpoint.revision == 3:
            break
    ep = _wait_for_revision(stub, "canary-slow", 3)
    assert [(t.model, t.version) for t in ep.policy.targets] == [("mlp", 1)]
    rev = stub.ListPolicyRevisions(pb.ListPolicyRevisionsRequest(endpoint="canary-slow")).revisions[0]
    assert "p99" in rev.reason, rev.reason


def test_every_response_names_the_version(inference: Inference) -> None:
    stub = inference.stub()
    _create(stub, "named", policy(("mlp", 2, 1)))
    r = stub.Predict(_request("named"))
    assert (r.endpoint, r.model, r.version, r.policy_revision) == ("named", "mlp", 2, 1)


def test_an_unknown_output_name_is_refused_before_the_model_runs(inference: Inference) -> None:
    stub = inference.stub()
    _create(stub, "outputs-checked", policy(("mlp", 1, 1)))
    good = stub.Predict(_request("outputs-checked", rid="outputs-good"))
    req = _request("outputs-checked", rid="outputs-bad")
    req.output_names.append("no-such-output")
    with pytest.raises(grpc.RpcError) as e:
        stub.Predict(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "output_names[0]" in e.value.details()
    deadline = time.time() + 10
    logged: set[str] = set()
    while "outputs-good" not in logged and time.time() < deadline:  # the log is flushed every 20 ms
        logged = {r.request_id for f in (inference.home / "inference" / "predictions").glob("*.binpb")
                  for r in read_records(f)}
        time.sleep(0.1)
    assert good.version == 1 and "outputs-good" in logged and "outputs-bad" not in logged


def test_metrics_per_endpoint_and_version_summed_over_processes(serving: Inference) -> None:
    """The parent's /metrics merges every serving process (prometheus-client multiprocess mode)."""
    import urllib.request
    stub = serving.stub()
    _create(stub, "metered", policy(("mlp", 1, 1)))
    with ThreadPoolExecutor(8) as pool:  # several connections: both processes serve some
        list(pool.map(lambda _: serving.stub().Predict(_request("metered")), range(200)))

    def total() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{serving.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("strata_inference_predictions_total{") and 'endpoint="metered"' in line
                   and 'version="1"' in line and 'outcome="ok"' in line)
    deadline = time.time() + 10
    while total() < 200 and time.time() < deadline:
        time.sleep(0.2)
    assert total() == 200


def test_statistics_table_is_pruned_on_a_schedule(registry: Registry,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """Per-target statistics are kept for the newest revisions only, and the figures a serving
    process reports after its endpoint was deleted do not stay behind: the table stays bounded."""
    import sqlite3
    srv = start_inference(registry, tmp_path_factory.mktemp("inference-prune"),
                          STRATA_INFERENCE_STATS_KEEP_REVISIONS="2", STRATA_INFERENCE_STATS_PRUNE_SECONDS="0.2")
    try:
        stub = srv.stub()
        _create(stub, "churn", policy(("mlp", 1, 1)))
        for i in range(6):
            for _ in range(5):
                stub.Predict(_request("churn"))
            stub.GetEndpointStats(pb.GetEndpointStatsRequest(endpoint="churn"))  # writes this revision's rows
            stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="churn",
                                                             policy=policy(("mlp", 1 + i % 3, 1))))
        _create(stub, "doomed", policy(("mlp", 1, 1)))
        for _ in range(5):
            stub.Predict(_request("doomed"))
        stub.DeleteEndpoint(pb.DeleteEndpointRequest(name="doomed"))
        time.sleep(1.5)  # the process reports its last figures of the deleted endpoint meanwhile

        def rows() -> list[tuple[str, int]]:
            with sqlite3.connect(srv.home / "inference.db") as db:
                return db.execute("SELECT endpoint, revision FROM target_stats").fetchall()
        deadline = time.time() + 10
        while time.time() < deadline and any(e == "doomed" for e, _ in rows()):
            time.sleep(0.1)
        left = rows()
        assert left and {e for e, _ in left} == {"churn"}
        assert min(r for _, r in left) >= 7 - 2 + 1, left  # revision 7 is current; 2 are kept
    finally:
        stop_process(srv.proc)
