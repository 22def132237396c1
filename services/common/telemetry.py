"""Structured logging, Prometheus metrics and OpenTelemetry tracing, set up once per process."""

from __future__ import annotations

import contextvars
import json
import logging
import os
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

# CPU and memory of each serving process. prometheus_client's own process collector describes only
# the process that serves /metrics: in multi-process mode (services/common/workers.py) that is the
# parent, whose registry holds the workers' merged files and no process collector at all. These
# gauges are written by every serving process into its own file ("liveall": one series per live
# process, labelled `pid` by the merge) and carry `worker`, the serving slot (0 .. workers-1; 0 for
# a service that runs one process), so a restarted worker keeps its slot.
PROCESS_CPU = Gauge("strata_process_cpu_seconds", "CPU time (user + system) this serving process has used; "
                    "rate() it", ["service", "worker"], multiprocess_mode="liveall")
PROCESS_RSS = Gauge("strata_process_resident_memory_bytes", "Resident memory of this serving process",
                    ["service", "worker"], multiprocess_mode="liveall")
PROCESS_START = Gauge("strata_process_start_time_seconds", "When this serving process started (Unix time)",
                      ["service", "worker"], multiprocess_mode="liveall")
_SLOT_ENV = "STRATA_REUSEPORT_SLOT"  # reuseport.SLOT_ENV: the slot its parent gave a serving process


def _resident_bytes() -> float | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the peak, the best the OS tells
        try:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return float(peak if sys.platform == "darwin" else peak * 1024)
        except (ImportError, OSError):
            return None


class ProcessMetrics:
    """Samples this process's CPU time and resident memory into the gauges above, at most every
    `every` seconds (RpcMetrics.flush calls it; a sample costs a few microseconds: os.times() and
    one read of /proc/self/statm)."""

    def __init__(self, service: str, every: float = 1.0, worker: str | None = None) -> None:
        worker = worker if worker is not None else os.environ.get(_SLOT_ENV, "0")
        self._cpu = PROCESS_CPU.labels(service, worker)
        self._rss = PROCESS_RSS.labels(service, worker)
        PROCESS_START.labels(service, worker).set(_process_start_time())
        self._every = every
        self._last = -every

    def sample(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._last < self._every:
            return
        self._last = now
        t = os.times()
        self._cpu.set(t.user + t.system)
        rss = _resident_bytes()
        if rss is not None:
            self._rss.set(rss)


_IMPORTED = time.time()


def _process_start_time() -> float:
    """When this process started (Unix time): /proc/self/stat's start time where there is one,
    else when this module was imported."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


class RpcMetrics:
    """The RPC metrics of one serving process, tallied in plain Python and added to the
    Prometheus metrics in bulk by `flush` (every `FLUSH_SECONDS` from the server, and at once
    after a failed call). In multi-process mode each prometheus_client update takes a lock, a
    getpid() syscall and an mmap write; the five a call made cost ~40 us of a ~550 us online
    feature read in the serving process (docs/performance.md). Successful calls therefore reach
    /metrics up to a flush interval late; failures at once. Single-threaded: the event loop
    records and flushes. A flush also samples the process's CPU and memory (`ProcessMetrics`, at
    most once per interval)."""

    FLUSH_SECONDS = 1.0

    def __init__(self, service: str) -> None:
        self.service = service
        self.in_flight = 0
        self._gauge = RPC_IN_FLIGHT.labels(service)
        self._calls: dict[tuple[str, str], int] = {}          # (method, status code) -> calls
        self._latency: dict[str, list[float]] = {}            # method -> [sum, count per bucket ..., +Inf]
        self.process = ProcessMetrics(service, every=self.FLUSH_SECONDS)

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
        self.process.sample()


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


#: Whether this process traces (`setup_tracing` installed the SDK provider): what outgoing calls
#: check first (services/common/client.py), a module attribute read instead of the ~0.4 us of
#: asking OpenTelemetry's context for the current span.
TRACING = False


def setup_tracing(service: str, exporter: str, otlp_endpoint: str) -> None:
    """Install the SDK tracer provider (STRATA_TRACING: "otlp" exports to the OTLP/gRPC collector
    at STRATA_OTLP_ENDPOINT, host:port or http(s)://host:port; "console" prints spans). With
    exporter "none" the no-op API tracer stays in place, so tracing costs nothing on the hot path:
    no server spans (interceptor.py) and no trace context on outgoing calls (client.py), whose
    only per-call cost is the check that the current span is invalid. Spans leave in batches
    (the SDK's OTEL_BSP_* settings: every 5 s by default) and the rest at exit."""
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

        span_exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=not otlp_endpoint.startswith("https://"))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    global TRACING
    TRACING = True
