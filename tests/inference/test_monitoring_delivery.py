"""The prediction log delivered to the monitoring service, against real processes: a registry, a
monitoring service and an inference service with two serving processes (sharing one spool),
STRATA_INFERENCE_MONITORING pointing at monitoring. Each prediction is counted in monitoring by
its prediction id: ground truth for every id the test made is accepted (ReportGroundTruth is all
or nothing and refuses an id it does not hold), and GetPerformance then reports exactly that many
rows, all labelled: nothing lost, nothing stored twice."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from strata.inference.v1 import inference_pb2 as pb
from strata.inference.v1 import inference_pb2_grpc
from strata.monitoring.v1 import monitoring_pb2 as mpb
from strata.monitoring.v1 import monitoring_pb2_grpc

from services.clients.registry import RegistryClient
from services.common.errors import Unavailable
from services.inference.monitoring_sink import MonitoringSink, messages
from services.inference.predlog import FileSink
from services.inference.predlog_format import Encoder, read_records
from tests.inference.conftest import Inference, Registry, start_inference
from tests.monitoring.conftest import FEATURES, classifier_onnx
from tests.processes import free_port, start_service, stop_process

MODEL = "delivery-clf"


@dataclass
class Monitoring:
    home: Path
    port: int
    env: dict[str, str]
    proc: object = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = start_service("monitoring", self.home, self.port, self.env)

    def kill(self) -> None:
        self.proc.kill()  # type: ignore[attr-defined]
        self.proc.wait()  # type: ignore[attr-defined]

    def stub(self) -> monitoring_pb2_grpc.MonitoringServiceStub:
        return monitoring_pb2_grpc.MonitoringServiceStub(grpc.insecure_channel(self.addr))


@pytest.fixture(scope="module")
def classifier(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two versions of a classifier shaped as the platform's models ([rows, 1] per feature; label
    and probabilities), registered once."""
    path = tmp_path_factory.mktemp("clf") / "clf.onnx"
    with RegistryClient(registry.addr) as client:
        for v, classes in ((1, 2), (2, 3)):
            path.write_bytes(classifier_onnx(classes=classes))
            client.register_onnx(MODEL, path, create_model=(v == 1))
    return MODEL


@pytest.fixture(scope="module")
def monitoring(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitoring]:
    mon = Monitoring(tmp_path_factory.mktemp("monitoring"), free_port(), {
        "STRATA_AUTH": "disabled", "STRATA_REGISTRY_ADDR": registry.addr, "STRATA_MONITORING_COMPACT_SECONDS": "0.5"})
    mon.start()
    try:
        yield mon
    finally:
        stop_process(mon.proc)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sending(registry: Registry, monitoring: Monitoring, classifier: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    """Inference whose prediction log goes to monitoring (retried every 5 s, the default)."""
    srv = start_inference(registry, tmp_path_factory.mktemp("inference-monitored"), workers=2,
                          STRATA_INFERENCE_MONITORING=monitoring.addr)
    try:
        yield srv
    finally:
        stop_process(srv.proc)


def _create(inference: Inference, name: str, shadow: bool = False) -> None:
    policy = pb.TrafficPolicy(targets=[pb.Target(model=MODEL, version=1, weight=1)],
                              shadows=[pb.Target(model=MODEL, version=2)] if shadow else [])
    inference.stub().CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(name=name, policy=policy)))


def _inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f: rng.standard_normal((rows, 1)).astype(np.float32) for f in FEATURES}


class Burst:
    """Concurrent Predict and V2 ModelInfer calls on one endpoint (every fourth a V2 call, every
    tenth with 3 rows), each with its own request id, at most `window` in flight; `ids` are the
    prediction ids they make. Started in the background."""

    def __init__(self, inference: Inference, endpoint: str, n: int, window: int = 128) -> None:
        from tritonclient.grpc import service_pb2_grpc as v2g  # tritonclient's own generated code

        self.channel = inference.channel()  # kept: a channel collected cancels its calls
        predict = inference_pb2_grpc.InferenceServiceStub(self.channel).Predict
        infer = v2g.GRPCInferenceServiceStub(self.channel).ModelInfer
        self.ids: list[str] = []
        self.calls: list[grpc.Future] = []
        slots = threading.BoundedSemaphore(window)
        self._thread = threading.Thread(target=self._submit, args=(endpoint, n, slots, predict, infer), daemon=True)
        self._thread.start()

    def _submit(self, endpoint: str, n: int, slots: threading.BoundedSemaphore, predict, infer) -> None:  # noqa: ANN001
        from tritonclient.grpc import service_pb2 as v2

        for i in range(n):
            slots.acquire()
            rid, rows = f"{endpoint}-{i}-{uuid.uuid4().hex[:8]}", 3 if i % 10 == 0 else 1
            x = _inputs(rows, i)
            if i % 4 == 0:
                req = v2.ModelInferRequest(model_name=endpoint, id=rid)
                for f, a in x.items():
                    req.inputs.add(name=f, datatype="FP32", shape=list(a.shape))
                    req.raw_input_contents.append(a.tobytes())
                call = infer.future(req, timeout=60)
            else:
                call = predict.future(pb.PredictRequest(endpoint=endpoint, request_id=rid, inputs=[
                    pb.Tensor(name=f, shape=list(a.shape), raw=a.tobytes()) for f, a in x.items()]), timeout=60)
            call.add_done_callback(lambda _: slots.release())
            self.calls.append(call)
            self.ids += [f"{rid}:{r}" for r in range(rows)]

    def done(self) -> int:
        return sum(c.done() for c in self.calls)

    def wait(self) -> None:
        self._thread.join(120)
        for c in self.calls:
            c.result()  # raises what a call failed with


def _versions(mon: Monitoring, endpoint: str) -> dict[tuple[int, bool], mpb.VersionPerformance]:
    try:
        resp = mon.stub().GetPerformance(mpb.GetPerformanceRequest(endpoint=endpoint), timeout=30)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):  # nothing yet / restarting
            return {}
        raise
    return {(v.version, v.shadow): v for v in resp.versions}


def _rows(mon: Monitoring, endpoint: str) -> dict[tuple[int, bool], int]:
    return {k: v.rows for k, v in _versions(mon, endpoint).items()}


def _wait_rows(mon: Monitoring, endpoint: str, want: dict[tuple[int, bool], int], timeout: float = 25) -> None:
    deadline = time.monotonic() + timeout
    while _rows(mon, endpoint) != want and time.monotonic() < deadline:
        time.sleep(0.25)
    assert _rows(mon, endpoint) == want


def _labelled_exactly_once(mon: Monitoring, endpoint: str, ids: list[str]) -> dict[tuple[int, bool], int]:
    """Every id is stored (else ReportGroundTruth refuses the call by name), and no row twice."""
    stub = mon.stub()
    for start in range(0, len(ids), 50_000):
        stub.ReportGroundTruth(mpb.ReportGroundTruthRequest(labels=[
            mpb.GroundTruth(prediction_id=i, number=0) for i in ids[start:start + 50_000]]), timeout=60)
    got = _versions(mon, endpoint)
    assert all(v.labeled_rows == v.rows for v in got.values()), got
    return {k: v.rows for k, v in got.items()}


def _metric(inference: Inference, outcome: str) -> float:
    text = requests.get(f"http://127.0.0.1:{inference.metrics_port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("strata_inference_prediction_log_total{") and f'outcome="{outcome}"' in line)


def test_every_prediction_of_a_burst_arrives_exactly_once(sending: Inference, monitoring: Monitoring) -> None:
    _create(sending, "burst")
    burst = Burst(sending, "burst", 2000)
    burst.wait()
    assert len(burst.ids) == 2400
    _wait_rows(monitoring, "burst", {(1, False): 2400})
    assert _labelled_exactly_once(monitoring, "burst", burst.ids) == {(1, False): 2400}


def test_monitoring_killed_during_a_burst_gets_every_prediction_once_after_replay(
        sending: Inference, monitoring: Monitoring) -> None:
    _create(sending, "outage")
    spooled = _metric(sending, "spooled")
    burst = Burst(sending, "outage", 2000)
    while burst.done() < 500:
        time.sleep(0.005)
    monitoring.kill()  # SIGKILL mid-burst: streams cut, the write-ahead log possibly torn
    burst.wait()  # serving never depends on monitoring
    time.sleep(0.2)  # the last batches leave the queue for the spool
    assert _metric(sending, "spooled") > spooled
    monitoring.start()
    _wait_rows(monitoring, "outage", {(1, False): 2400})
    assert _labelled_exactly_once(monitoring, "outage", burst.ids) == {(1, False): 2400}


def test_shadow_predictions_are_reported_apart_from_the_served_ones(sending: Inference,
                                                                     monitoring: Monitoring) -> None:
    _create(sending, "shadowed", shadow=True)
    burst = Burst(sending, "shadowed", 300)
    burst.wait()
    want = {(1, False): 360, (2, True): 360}
    _wait_rows(monitoring, "shadowed", want)
    assert _labelled_exactly_once(monitoring, "shadowed", burst.ids) == want  # one label serves both rows


def test_records_monitoring_refuses_are_set_aside_and_the_rest_stored(monitoring: Monitoring, tmp_path: Path) -> None:
    """A record monitoring can never take (a request id over 256 characters) must not hold up the
    records around it: the sink isolates it, keeps it in a file of its own and reports it."""
    enc = Encoder().encode
    x = _inputs(1, 0)
    outs = [("label", np.zeros(1, np.int64)), ("probabilities", np.full((1, 2), 0.5, np.float32))]
    rids = [f"refuse-{i}-{uuid.uuid4().hex[:8]}" for i in range(7)]
    rids[3] = "x" * 300
    records = [enc((time.time(), rid, "refusals", MODEL, 1, 1, False, 1.0, x, outs, "")) for rid in rids]
    sink = MonitoringSink(monitoring.addr, None, FileSink(tmp_path / "rejected.binpb"), timeout=30)
    try:
        assert sink.write(records) == 1
        assert sink.write(records) == 1  # a retry: the good ones are duplicates, stored once
    finally:
        sink.close()
    assert [r.request_id for r in read_records(tmp_path / "rejected.binpb")] == ["x" * 300] * 2
    assert _rows(monitoring, "refusals") == {(1, False): 6}


def test_monitoring_down_is_unavailable_so_the_log_spools(tmp_path: Path) -> None:
    sink = MonitoringSink(f"127.0.0.1:{free_port()}", None, FileSink(tmp_path / "rejected.binpb"), timeout=5)
    with pytest.raises(Unavailable):
        sink.write([b""])


def test_records_are_framed_as_ingest_messages_of_bounded_size() -> None:
    enc = Encoder().encode
    x = _inputs(1, 0)
    records = [enc((time.time(), "r" * (i + 1), "e", MODEL, 1, 1, False, 1.0, x, [], "")) for i in range(50)]
    msgs = list(messages(records, limit=1000))
    assert len(msgs) > 1 and all(len(m) <= 1000 for m in msgs)
    assert [r for m in msgs for r in mpb.IngestPredictionsRequest.FromString(m).records] == [
        pb.PredictionRecord.FromString(r) for r in records]
    big = bytes(5000)
    assert list(messages([big], limit=1000)) == [b"\x0a" + bytes([0x88, 0x27]) + big]  # alone, whatever its size
