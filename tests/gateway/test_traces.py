"""Traces, end to end against real processes: an OTLP/gRPC receiver in the test process (the
collector), a registry, a feature service with pushed rows, a monitoring service and an inference
service serving a model whose lineage names its features (so predicting by entity key reads the
feature store), all with STRATA_TRACING=otlp, behind a real Envoy gateway whose OpenTelemetry
tracer exports to the same receiver. One REST predict-by-entity-key request makes one trace:
Envoy's span, inference's Predict server span (its child), inference's CLIENT span of the
GetOnlineFeatures call and the feature service's server span (descendants). The prediction log's
delivery to monitoring is a trace of its own (`prediction_log.deliver`, monitoring's
IngestPredictions its child). A gateway without tracing passes a client's traceparent upstream
unchanged; an inference service with tracing off still serves and sends no trace context on."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from strata.features.v1 import features_pb2_grpc
from strata.inference.v1 import inference_pb2 as pb
from strata.registry.v1 import registry_pb2 as rpb

from gateway.config import GatewayTracing, render_envoy_config
from gateway.envoy import start_envoy, wait_ready, write_config
from services.clients.registry import RegistryClient
from tests.features.conftest import service_online_store
from tests.inference import models
from tests.inference.conftest import Registry, policy, start_inference
from tests.inference.test_entity_features import (
    BIAS,
    COLUMNS,
    FEATURES,
    ROWS,
    WEIGHTS,
    _define_and_push,
    _expected,
)
from tests.processes import free_port, start_service, stop_process

DESCRIPTOR = Path(__file__).resolve().parents[2] / "gateway" / "strata.pb"
PREDICT = "strata.inference.v1.InferenceService/Predict"
ONLINE = "strata.features.v1.FeatureService/GetOnlineFeatures"
INGEST = "strata.monitoring.v1.MonitoringService/IngestPredictions"
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any] = field(hash=False, compare=False)


def _value(v: Any) -> Any:  # noqa: ANN401 - an OTLP AnyValue
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._cond = threading.Condition()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext  # noqa: N802
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            service = next((_value(a.value) for a in rs.resource.attributes if a.key == "service.name"), "")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(Span(service, s.name, s.kind, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                    {a.key: _value(a.value) for a in s.attributes}))
        with self._cond:
            self.spans += got
            self._cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait(self, found: Callable[[list[Span]], Any], timeout: float = 15, what: str = "spans") -> Any:  # noqa: ANN401
        """found(spans) once it is truthy; fails with the spans seen after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (result := found(list(self.spans))):
                left = deadline - time.monotonic()
                assert left > 0, f"{what} never arrived; received: " + "\n".join(map(repr, self.spans))
                self._cond.wait(left)
            return result

    def trace(self, trace_id: str) -> list[Span]:
        with self._cond:
            return [s for s in self.spans if s.trace_id == trace_id]


@dataclass
class Platform:
    receiver: Receiver
    traced_gateway: str      # Envoy with its tracer, in front of the traced inference service
    plain_gateway: str       # Envoy without a tracer, in front of the traced inference service
    untraced_gateway: str    # Envoy without a tracer, in front of an inference service with tracing off


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    rec = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield rec, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def _gateway(tmp: Path, inference: str, tracing: GatewayTracing | None) -> Iterator[str]:
    port, admin = free_port(), free_port()
    config = render_envoy_config(upstreams={"inference": inference}, descriptor_path=DESCRIPTOR, auth_enabled=False,
                                 listen_host="127.0.0.1", listen_port=port, admin_port=admin, tracing=tracing)
    if tracing is not None:  # spans leave at once instead of every 5 s
        config["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {
            "tracing.opentelemetry.flush_interval_ms": 50, "tracing.opentelemetry.min_flush_spans": 1}}]}
    path = write_config(config, tmp)
    log = tmp / "envoy.log"
    process = start_envoy(path, log)
    try:
        wait_ready(admin, timeout=30, process=process)
        yield f"http://127.0.0.1:{port}"
    except Exception:
        print(log.read_text())
        raise
    finally:
        stop_process(process, timeout=10)


@pytest.fixture(scope="module")
def platform(receiver: tuple[Receiver, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    rec, collector = receiver
    traced = {"STRATA_AUTH": "disabled", "STRATA_TRACING": "otlp", "STRATA_OTLP_ENDPOINT": collector,
              "OTEL_BSP_SCHEDULE_DELAY": "50"}
    procs = []
    gateways: list[Iterator[str]] = []
    try:
        home = tmp_path_factory.mktemp("registry")
        port = free_port()
        procs.append(start_service("registry", home, port, {**traced, "STRATA_REGISTRY_WORKERS": "1"}))
        registry = Registry(f"127.0.0.1:{port}", {})
        blob = models.columns_linear(COLUMNS, WEIGHTS, BIAS)
        (home / "m.onnx").write_bytes(blob)
        with RegistryClient(registry.addr) as client:
            client.register_onnx("txn_score", home / "m.onnx", create_model=True, lineage=rpb.Lineage(
                features=FEATURES, feature_views=["txn:1"], feature_set="scoring", training_job_id="job-1"))

        home = tmp_path_factory.mktemp("features")
        port = free_port()
        with service_online_store(home, db=12) as online:
            procs.append(start_service("features", home, port, {
                **traced, "STRATA_FEATURES_ONLINE_STORE": online, "STRATA_FEATURES_WORKERS": "1"}))
            features = f"127.0.0.1:{port}"
            with grpc.insecure_channel(features) as ch:
                _define_and_push(features_pb2_grpc.FeatureServiceStub(ch))

            home = tmp_path_factory.mktemp("monitoring")
            port = free_port()
            procs.append(start_service("monitoring", home, port, {
                **traced, "STRATA_REGISTRY_ADDR": registry.addr, "STRATA_MONITORING_WORKERS": "1"}))
            monitoring = f"127.0.0.1:{port}"

            on = start_inference(registry, tmp_path_factory.mktemp("inference-traced"), **traced,
                                 STRATA_FEATURES_ADDR=features, STRATA_INFERENCE_MONITORING=monitoring)
            procs.append(on.proc)
            off = start_inference(registry, tmp_path_factory.mktemp("inference-untraced"),
                                  STRATA_FEATURES_ADDR=features, STRATA_TRACING="none")
            procs.append(off.proc)
            for srv in (on, off):
                srv.stub().CreateEndpoint(pb.CreateEndpointRequest(
                    endpoint=pb.Endpoint(name="txn", policy=policy(("txn_score", 1, 1)))))

            gateways = [_gateway(tmp_path_factory.mktemp("envoy-traced"), on.addr,
                                 GatewayTracing(collector, sampling_percent=100)),
                        _gateway(tmp_path_factory.mktemp("envoy-plain"), on.addr, None),
                        _gateway(tmp_path_factory.mktemp("envoy-untraced"), off.addr, None)]
            urls = [next(g) for g in gateways]
            yield Platform(rec, *urls)
    finally:
        for g in gateways:
            g.close()
        for p in reversed(procs):
            stop_process(p)


def _predict(gateway: str, customer: int, headers: dict[str, str] | None = None) -> float:
    resp = requests.post(f"{gateway}/v1/endpoints/txn:predict", json={"entities": [{"customer_id": customer}]},
                         headers=headers or {}, timeout=30)
    assert resp.status_code == 200, resp.text
    score = resp.json()["rows"][0]["score"][0]
    assert score == pytest.approx(_expected(*ROWS[customer]), rel=1e-6)
    return score


def _one(spans: list[Span], **match: Any) -> Span | None:  # noqa: ANN401
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) <= 1, found
    return found[0] if found else None


def _ancestors(span: Span, spans: list[Span]) -> list[Span]:
    by_id = {s.span_id: s for s in spans}
    chain = []
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span)
    return chain


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def test_one_trace_from_the_gateway_through_inference_to_the_feature_store(platform: Platform) -> None:
    rec = platform.receiver
    _predict(platform.traced_gateway, 1)
    gateway = rec.wait(lambda spans: _one(spans, service="strata-gateway"), what="the gateway's span")
    trace_id = gateway.trace_id
    assert gateway.kind == SERVER and gateway.parent_id == ""  # a trace the gateway started

    def complete(spans: list[Span]) -> tuple[Span, Span] | None:
        mine = [s for s in spans if s.trace_id == trace_id]
        predict = _one(mine, service="strata-inference", name=PREDICT)
        online = _one(mine, service="strata-features", name=ONLINE, kind=SERVER)
        return (predict, online) if predict and online else None

    predict, online = rec.wait(complete, what="inference's and the feature store's spans in the gateway's trace")
    spans = rec.trace(trace_id)
    # Inference's server span is the child of the gateway's span; the feature read descends from it,
    # through inference's CLIENT span of the call.
    assert predict.kind == SERVER and predict.parent_id == gateway.span_id
    chain = _ancestors(online, spans)
    assert predict in chain, chain
    client = chain[0]
    assert (client.service, client.name, client.kind, client.parent_id) == \
        ("strata-inference", ONLINE, CLIENT, predict.span_id)
    assert client.attributes["rpc.grpc.status_code"] == 0
    # Every span of the trace hangs off the gateway's.
    for s in spans:
        assert s is gateway or gateway in _ancestors(s, spans), s

    # A traceparent a client sends is continued by the gateway: same trace, its span the parent.
    header, incoming_trace, incoming_span = _traceparent()
    _predict(platform.traced_gateway, 2, {"traceparent": header})
    continued = rec.wait(lambda spans: _one(spans, service="strata-gateway", trace_id=incoming_trace),
                         what="the gateway's span in the client's trace")
    assert continued.parent_id == incoming_span
    predict = rec.wait(lambda spans: _one(spans, name=PREDICT, trace_id=incoming_trace), what="the Predict span")
    assert predict.parent_id == continued.span_id


def test_calls_on_synchronous_channels_carry_the_trace_too(platform: Platform) -> None:
    """Creating the endpoints (direct gRPC calls to inference, no gateway) loaded the model: the
    registry client's calls (a blocking channel, from a worker thread; the artifact download a
    response stream) are CLIENT spans of CreateEndpoint's trace, each the parent of the
    registry's server span."""
    rec = platform.receiver

    def registry_calls(spans: list[Span]) -> list[tuple[Span, Span, Span]]:
        by_id = {s.span_id: s for s in spans}
        out = []
        for s in spans:
            client = by_id.get(s.parent_id)
            caller = by_id.get(client.parent_id) if client else None
            if s.service == "strata-registry" and s.kind == SERVER and caller is not None:
                out.append((caller, client, s))
        return out if any(c[2].name.endswith("/DownloadArtifact") for c in out) else []

    for caller, client, server in rec.wait(registry_calls, what="the registry's spans under inference's"):
        assert (caller.service, caller.name.rsplit("/", 1)[-1], caller.kind) == \
            ("strata-inference", "CreateEndpoint", SERVER), caller
        assert (client.service, client.name, client.kind) == ("strata-inference", server.name, CLIENT), client
        assert client.attributes["rpc.grpc.status_code"] == 0 and server.trace_id == caller.trace_id


def test_the_prediction_log_delivery_is_traced(platform: Platform) -> None:
    """Predictions reach monitoring in batches that belong to no request: each delivery is a trace
    of its own, which monitoring's IngestPredictions joins (the prediction id links a prediction
    to its request)."""
    rec = platform.receiver
    _predict(platform.traced_gateway, 3)

    def delivered(spans: list[Span]) -> tuple[Span, Span] | None:
        for d in spans:
            if d.service == "strata-inference" and d.name == "prediction_log.deliver":
                ingest = next((s for s in spans if s.name == INGEST and s.parent_id == d.span_id), None)
                if ingest is not None:
                    return d, ingest
        return None

    deliver, ingest = rec.wait(delivered, what="a traced delivery to monitoring")
    assert deliver.parent_id == "" and deliver.attributes["prediction_log.records"] >= 1
    assert (ingest.service, ingest.kind, ingest.trace_id) == ("strata-monitoring", SERVER, deliver.trace_id)


def test_a_gateway_without_tracing_passes_the_traceparent_on_unchanged(platform: Platform) -> None:
    rec = platform.receiver
    header, trace_id, span_id = _traceparent()
    _predict(platform.plain_gateway, 1, {"traceparent": header})
    predict = rec.wait(lambda spans: _one(spans, name=PREDICT, trace_id=trace_id), what="the Predict span")
    assert predict.parent_id == span_id  # the client's span, as sent: the gateway added none
    rec.wait(lambda spans: _one(spans, name=ONLINE, kind=SERVER, trace_id=trace_id), what="the feature read")
    assert not [s for s in rec.trace(trace_id) if s.service == "strata-gateway"]


def test_with_tracing_off_requests_work_and_carry_no_trace_context(platform: Platform) -> None:
    """The inference service behind this gateway runs with STRATA_TRACING=none: it serves as ever,
    and its calls to the feature store (which traces) carry no traceparent, not even the one the
    client sent: the feature store's spans of those calls start traces of their own."""
    rec = platform.receiver
    header, trace_id, _ = _traceparent()
    seen = len(rec.spans)
    _predict(platform.untraced_gateway, 2, {"traceparent": header})
    _predict(platform.untraced_gateway, 3)
    def reads_of(spans: list[Span]) -> list[Span]:
        return [s for s in spans[seen:] if s.name == ONLINE and s.kind == SERVER]

    rec.wait(lambda spans: len(reads_of(spans)) >= 2, what="the feature store's spans")
    time.sleep(0.3)  # anything else the two requests caused has been exported by now
    new = rec.spans[seen:]
    reads = reads_of(rec.spans)
    assert len(reads) == 2, new
    assert all(s.parent_id == "" and s.trace_id != trace_id for s in reads), reads
    # (The traced inference service may still be delivering the earlier tests' predictions.)
    assert not [s for s in new if s.service == "strata-gateway" or s.name == PREDICT], new
