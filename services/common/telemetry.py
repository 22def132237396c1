"""Structured logging, Prometheus metrics and OpenTelemetry tracing, set up once per process."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("strata_request_id", default="")

# Latency buckets from 100 us to 30 s: registry reads sit around a millisecond, uploads take seconds.
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

RPC_REQUESTS = Counter("strata_grpc_requests_total", "RPCs handled", ["service", "method", "code"])
RPC_LATENCY = Histogram("strata_grpc_request_duration_seconds", "RPC latency", ["service", "method"], buckets=_BUCKETS)
RPC_IN_FLIGHT = Gauge("strata_grpc_in_flight", "RPCs being handled", ["service"])


class RpcMetrics:
    """The RPC metrics of one serving process, tallied in plain Python and added to the
    Prometheus metrics in bulk by `flush` (every `FLUSH_SECONDS` from the server, and at once
    after a failed call). In multi-process mode each prometheus_client update takes a lock, a
    getpid() syscall and an mmap write; the five a call made cost ~40 us of a ~550 us online
    feature read in the serving process (docs/performance.md). Successful calls therefore reach
    /metrics up to a flush interval late; failures at once. Single-threaded: the event loop
    records and flushes."""

    FLUSH_SECONDS = 1.0

    def __init__(self, service: str) -> None:
        self.service = service
        self.in_flight = 0
        self._gauge = RPC_IN_FLIGHT.labels(service)
        self._calls: dict[tuple[str, str], int] = {}          # (method, status code) -> calls
        self._latency: dict[str, list[float]] = {}            # method -> [sum, count per bucket ..., +Inf]

    def record(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        self._calls[key] = self._calls.get(key, 0) + 1
        tally = self._latency.get(method)
        if tally is None:
            tally = self._latency[method] = [0.0] * (len(_BUCKETS) + 2)
        tally[0] += seconds
        tally[1 + bisect_left(_BUCKETS, seconds)] += 1  # the first bucket whose bound is >= seconds

    def flush(self) -> None:
        calls, self._calls = self._calls, {}
        latency, self._latency = self._latency, {}
        for (method, code), n in calls.items():
            RPC_REQUESTS.labels(self.service, method, code).inc(n)
        for method, tally in latency.items():
            hist = RPC_LATENCY.labels(self.service, method)
            # Histogram has no bulk observe: its own per-bucket values take the counts (what
            # observe() increments; tests/common/test_telemetry.py checks the exposition).
            hist._sum.inc(tally[0])  # noqa: SLF001
            for bucket, n in zip(hist._buckets, tally[1:], strict=True):  # noqa: SLF001
                if n:
                    bucket.inc(n)
        self._gauge.set(self.in_flight)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id of the call being handled."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        extra = getattr(record, "fields", None)
        if extra:
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def setup_tracing(service: str, exporter: str, otlp_endpoint: str) -> None:
    """Install the SDK tracer provider. With exporter "none" the no-op API tracer stays in
    place, so tracing costs nothing on the hot path."""
    if exporter == "none":
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": f"strata-{service}"}))
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
