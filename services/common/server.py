"""The one server bootstrap every service uses.

`run(build)` starts a grpc.aio server with: the Strata interceptor, wrapped around each method
handler at registration (request id, tracing, authentication, role check from the method's
declared AccessPolicy, domain error -> status mapping, metrics, access log, audit record for
mutating calls), gRPC health checking, server
reflection, message size limits, optional TLS/mTLS, a Prometheus endpoint, and a graceful
shutdown on SIGTERM/SIGINT that stops taking calls and lets in-flight ones finish.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import itertools
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import start_http_server

from services.common import reuseport, telemetry
from services.common.audit import AuditLog, AuditRecord, current_resource, request_resource
from services.common.auth import ANONYMOUS_ADMIN, Authenticator, Principal, current_principal
from services.common.errors import PermissionDenied, StrataError, UndecodableRequest
from services.common.policy import ROLE_NAMES, MethodPolicy, policies_for, rank_of
from services.common.reflection import add_reflection
from services.common.settings import ServiceSettings

log = logging.getLogger("strata.server")
access_log = logging.getLogger("strata.access")


def _status_details(err: StrataError) -> tuple[tuple[str, bytes], ...]:
    """google.rpc.Status with a BadRequest field violation, so REST clients (via Envoy's
    convert_grpc_status) and gRPC clients both learn which field was wrong."""
    if not err.field:
        return ()
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=err.field, description=err.message)]))
    st = status_pb2.Status(code=err.code.value[0], message=err.message, details=[detail])
    return (("grpc-status-details-bin", st.SerializeToString()),)


class StrataInterceptor:
    """Everything cross-cutting about a call, in one wrapper (one layer instead of five).

    It sits on every call of the inference and online-feature hot paths, so it is written for
    speed: each handler is wrapped once, when services register (`_Registrar`; not a grpc
    interceptor, which runs a chain of coroutines per call), metrics are tallied and added to
    Prometheus in bulk (`telemetry.RpcMetrics`), request ids come from a per-process prefix and
    a counter (no syscall), and a call that mutates nothing finishes without another await."""

    def __init__(self, service: str, policies: dict[str, MethodPolicy],
                 authenticator: Authenticator | None, audit_log: AuditLog | None, tracing: bool = False) -> None:
        self._service = service
        # Spans only when tracing is configured: the no-op path costs nothing per call.
        self._tracer = trace.get_tracer("strata.server") if tracing else None
        self._policies = policies
        self._auth = authenticator
        self._audit = audit_log
        self.metrics = telemetry.RpcMetrics(service)
        self._wrapped: dict[str, tuple[object, grpc.RpcMethodHandler]] = {}
        self._ranks: dict[frozenset[str], int] = {}  # a principal's roles -> their best rank
        self._rid_prefix = uuid.uuid4().hex[:12]
        self._rid_counter = itertools.count(1)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of the method at `method` ("/pkg.Service/Method") with the per-call steps
        around it; done once per method when services register (see `_Registrar`)."""
        policy = self._policies.get(method)  # None: health, reflection (public, not audited)
        wrap = self._wrap_unary if not handler.response_streaming else self._wrap_stream
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        behavior = wrap(method, policy, inner)
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
                    (handler.request_streaming, handler.response_streaming)]
        return kind(behavior,
                    request_deserializer=_decoding(handler.request_deserializer, handler.request_streaming),
                    response_serializer=_allow_encoded(handler.response_serializer))

    def wrap_cached(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """As `wrap`, for handlers found per call (generic handlers): wrapped once per method."""
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    # -- per call ----------------------------------------------------------------------------
    def _span(self, method: str, md: dict) -> AbstractContextManager[Span | None]:
        if self._tracer is None:
            return nullcontext()
        service, _, name = method[1:].partition("/")
        return self._tracer.start_as_current_span(
            method[1:], context=propagate.extract(md), kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})

    @staticmethod
    def _end_span(span: Span | None, code: grpc.StatusCode, message: str) -> None:
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.set_attribute("strata.request_id", telemetry.request_id_var.get())
            if code != grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))

    def _begin(self, method: str, policy: MethodPolicy | None, md: dict, request: object = None) -> None:
        rid = md.get("x-request-id") or f"{self._rid_prefix}-{next(self._rid_counter):x}"
        telemetry.request_id_var.set(rid if isinstance(rid, str) else rid.decode())
        # Audited calls name their resource from the request before anything can refuse them, so
        # a refused call's audit row names it too; the servicer may name it more exactly.
        current_resource.set(request_resource(policy.resource, request)
                             if policy is not None and policy.mutates else "")
        if policy is None or policy.public:
            current_principal.set(ANONYMOUS_ADMIN if self._auth is None else _NOBODY)
            return
        if self._auth is None:  # STRATA_AUTH=disabled
            current_principal.set(ANONYMOUS_ADMIN)
            return
        principal = self._auth.authenticate(md.get("authorization"))
        current_principal.set(principal)
        rank = self._ranks.get(principal.roles)
        if rank is None:
            rank = self._ranks[principal.roles] = rank_of(principal.roles)
            if len(self._ranks) > 1024:  # role sets are few; never let them grow without bound
                self._ranks.clear()
        if rank < policy.min_role:
            raise PermissionDenied(
                f"{method.rsplit('/', 1)[-1]} needs role {ROLE_NAMES[policy.min_role]}; "
                f"{principal.subject} has {sorted(principal.roles) or 'none'}")

    def _classify(self, exc: BaseException, context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str]:
        if isinstance(exc, StrataError):
            return exc.code, exc.message
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED, "cancelled"
        if isinstance(exc, grpc.aio.AbortError):  # the servicer aborted by itself
            return context.code() or grpc.StatusCode.UNKNOWN, context.details() or ""
        log.exception("unhandled error", exc_info=exc)
        return grpc.StatusCode.INTERNAL, "internal error"

    async def _abort(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Turn a domain error into its status (with field details); hide anything else
        behind INTERNAL and the request id (the log has the traceback)."""
        if isinstance(exc, StrataError):
            await context.abort(exc.code, exc.message, trailing_metadata=_status_details(exc))
        if not isinstance(exc, grpc.aio.AbortError | asyncio.CancelledError):
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error (request id {telemetry.request_id_var.get()})")

    def _observe(self, method: str, policy: MethodPolicy | None, start: float,
                 code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - start
        short = method.rsplit("/", 1)[-1]
        metrics = self.metrics
        metrics.in_flight -= 1
        metrics.record(short, code.name, elapsed)
        if code is not grpc.StatusCode.OK:
            metrics.flush()  # failures show at once; successes within a flush interval
        level = logging.INFO if ((policy is not None and policy.mutates) or code != grpc.StatusCode.OK) \
            else logging.DEBUG
        if access_log.isEnabledFor(level):
            access_log.log(level, "rpc", extra={"fields": {
                "method": method, "code": code.name, "ms": round(elapsed * 1000, 3),
                "principal": current_principal.get().subject, "resource": current_resource.get()}})

    def _audits(self, policy: MethodPolicy | None, code: grpc.StatusCode) -> bool:
        # Unauthenticated calls have no principal worth recording; the access log has them.
        return (self._audit is not None and policy is not None and policy.mutates
                and code != grpc.StatusCode.UNAUTHENTICATED)

    def _record_audit(self, method: str, code: grpc.StatusCode, message: str) -> None:
        rec = AuditRecord(principal=current_principal.get().subject, method=method,
                          resource=current_resource.get(), request_id=telemetry.request_id_var.get(),
                          outcome=code.name, message="" if code == grpc.StatusCode.OK else message)
        try:
            self._audit.record(rec)  # type: ignore[union-attr]
        except Exception:  # an audit failure is loud but does not undo the call
            log.exception("audit record failed")

    async def _settle(self, method: str, policy: MethodPolicy | None, start: float, span: Span | None,
                      code: grpc.StatusCode, message: str) -> None:
        """Span, metrics, access log and (for mutating calls) the audit record. Runs before the
        status goes out: a client that saw the answer finds it in the audit log and the metrics."""
        self._end_span(span, code, message)
        self._observe(method, policy, start, code)
        if self._audits(policy, code):
            await asyncio.to_thread(self._record_audit, method, code, message)

    @asynccontextmanager
    async def _call(self, method: str, policy: MethodPolicy | None,
                    context: grpc.aio.ServicerContext, request: object = None) -> AsyncIterator[None]:
        """Around a streaming call: span, request id, auth, error mapping, metrics, log, audit."""
        start = time.perf_counter()
        self.metrics.in_flight += 1
        md = dict(context.invocation_metadata() or ())
        with self._span(method, md) as span:
            try:
                self._begin(method, policy, md, request)
                yield
            except BaseException as exc:
                code, message = self._classify(exc, context)
                await self._settle(method, policy, start, span, code, message)
                await self._abort(exc, context)
                raise
            await self._settle(method, policy, start, span, grpc.StatusCode.OK, "")

    def _wrap_unary(self, method: str, policy: MethodPolicy | None, inner: Callable) -> Callable:
        # The same steps as _call, spelled out: an async context manager costs about 10 us a call.
        quiet = policy is None or not policy.mutates

        async def behavior(request, context):  # noqa: ANN001
            if self._tracer is not None:
                async with self._call(method, policy, context, request):
                    if request.__class__ is _Undecodable:
                        raise request.error
                    return await inner(request, context)
            start = time.perf_counter()
            self.metrics.in_flight += 1
            try:
                self._begin(method, policy, dict(context.invocation_metadata() or ()), request)
                if request.__class__ is _Undecodable:  # after authentication: strangers learn nothing
                    raise request.error
                response = await inner(request, context)
            except BaseException as exc:
                code, message = self._classify(exc, context)
                await self._settle(method, policy, start, None, code, message)
                await self._abort(exc, context)
                raise
            if quiet:
                self._observe(method, policy, start, grpc.StatusCode.OK)
            else:
                await self._settle(method, policy, start, None, grpc.StatusCode.OK, "")
            return response
        return behavior

    def _wrap_stream(self, method: str, policy: MethodPolicy | None, inner: Callable) -> Callable:
        async def behavior(request, context):  # noqa: ANN001
            async with self._call(method, policy, context, request):
                if request.__class__ is _Undecodable:
                    raise request.error
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write()
                    await result
        return behavior


_NOBODY = Principal("unauthenticated", frozenset())


class _Registrar:
    """What services register their servicers with, in place of the server: every method
    handler is wrapped once, here, with the interceptor's per-call steps. Installed as a grpc
    interceptor instead, the same steps cost a chain of coroutines per call
    (intercept_service -> continuation -> handler lookup); measured in docs/performance.md."""

    def __init__(self, server: grpc.aio.Server, interceptor: StrataInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._interceptor.wrap(f"/{service}/{name}", h) for name, h in handlers.items()})

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self._interceptor) for h in handlers))


class _WrappedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, interceptor: StrataInterceptor) -> None:
        self._inner = inner
        self._interceptor = interceptor

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        return None if handler is None else self._interceptor.wrap_cached(handler_call_details.method, handler)


class _Undecodable:
    """A request message that did not decode, as `_decoding` hands it to the method's wrapper."""

    __slots__ = ("error",)

    def __init__(self, error: UndecodableRequest) -> None:
        self.error = error


def _decoding(deserializer: Callable | None, request_streaming: bool) -> Callable | None:
    """The method's request deserializer, with bytes that do not decode (corrupt wire format,
    invalid UTF-8 in a string field) refused as INVALID_ARGUMENT with a plain message, where
    grpc would answer UNKNOWN "Unexpected <class ...DecodeError>". A unary request is decoded
    before the method's wrapper runs: it becomes an `_Undecodable` that the wrapper raises once
    the caller is authenticated (and audits like any refusal). A streamed request is decoded as
    the handler reads it, inside the wrapper, so the error is raised there."""
    if deserializer is None:
        return None
    message_type = getattr(deserializer, "__self__", None)  # the generated Message.FromString
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "the method's request message"

    def deserialize(data: bytes):  # noqa: ANN202
        try:
            return deserializer(data)
        except Exception as e:  # protobuf raises DecodeError; any failure here means the same
            # protobuf's reason is its last clause ("Wire format was corrupt", "String field had
            # bad UTF-8"); the request's bytes are never echoed.
            reason = str(e).rsplit(": ", 1)[-1][:200] if isinstance(e, DecodeError) else type(e).__name__
            error = UndecodableRequest(f"the request does not decode as {name}: {reason}")
            if request_streaming:
                raise error from None
            return _Undecodable(error)
    return deserialize


def _allow_encoded(serializer: Callable | None) -> Callable | None:
    """A handler may answer with its response already serialized (bytes, e.g. the raw online
    feature read): it goes out as it is; messages are serialized as usual."""
    if serializer is None:
        return None

    def serialize(message):  # noqa: ANN001, ANN202
        return message if message.__class__ is bytes else serializer(message)
    return serialize


@dataclass
class Service:
    """What a service hands to `serve`: its servicers and lifecycle hooks."""

    settings: ServiceSettings
    descriptors: list[ServiceDescriptor]
    register: Callable[[grpc.aio.Server], None]
    audit_log: AuditLog | None = None
    #: Run before the server takes calls (e.g. load models), inside the serving loop.
    on_start: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    #: Services whose proto carries no access option (a fixed external protocol such as the
    #: KServe V2 one): their full names and per-method rules, declared in code.
    extra_services: list[str] = field(default_factory=list)
    extra_policies: dict[str, MethodPolicy] = field(default_factory=dict)
    #: Only the inference service's own worker processes share a port, on purpose.
    reuse_port: bool = False


def _credentials(s: ServiceSettings) -> grpc.ServerCredentials | None:
    if not s.tls_cert_file:
        return None
    key, cert = s.tls_key_file.read_bytes(), s.tls_cert_file.read_bytes()  # type: ignore[union-attr]
    ca = s.tls_client_ca_file.read_bytes() if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def server_options(s: ServiceSettings, reuse_port: bool = False) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        # Refuse to share the port: grpcio sets SO_REUSEPORT by default, and a second server
        # on the same port would silently take half of the traffic.
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


async def serve(svc: Service, started: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    s = svc.settings
    if s.auth == "disabled":
        log.warning("AUTHENTICATION IS DISABLED (STRATA_AUTH=disabled): every caller is admin. "
                    "Use this for local development only.")
    authenticator = None if s.auth == "disabled" else Authenticator(s)
    policies = {**policies_for(svc.descriptors), **svc.extra_policies}
    interceptor = StrataInterceptor(s.service, policies, authenticator, svc.audit_log,
                                    tracing=s.tracing != "none")
    server = grpc.aio.server(options=server_options(s, svc.reuse_port))
    registrar = _Registrar(server, interceptor)
    svc.register(registrar)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    names = [d.full_name for d in svc.descriptors] + svc.extra_services
    # Reflection v1 and v1alpha; behind the gateway, an answer for every service it routes.
    add_reflection(registrar, names)
    address = f"{s.host}:{s.port}"
    creds = _credentials(s)
    try:
        bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError as e:
        raise SystemExit(f"strata-{s.service}: cannot listen on {address} (port taken?): {e}") from None
    if s.metrics_port:
        try:
            start_http_server(s.metrics_port, addr="0.0.0.0" if s.host == "0.0.0.0" else s.host)
        except OSError as e:
            raise SystemExit(f"strata-{s.service}: metrics port {s.metrics_port} unavailable: {e}") from None
    for hook in svc.on_start:
        res = hook()
        if inspect.isawaitable(res):
            await res
    await server.start()
    if svc.reuse_port:  # one of several serving processes: take new connections in turn with the others
        reuseport.join_listener(bound)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"fields": {"service": s.service, "address": f"{s.host}:{bound}",
                                          "tls": creds is not None, "metrics_port": s.metrics_port}})
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    flusher = asyncio.ensure_future(_flush_metrics(interceptor.metrics))
    if started is not None:
        started.set()
    await stop.wait()
    log.info("shutting down: finishing in-flight calls", extra={"fields": {"grace_s": s.grace_seconds}})
    await health_servicer.enter_graceful_shutdown()
    await server.stop(s.grace_seconds)
    flusher.cancel()
    interceptor.metrics.flush()
    for hook in svc.on_stop:
        res = hook()
        if inspect.isawaitable(res):
            await res
    log.info("stopped")


async def _flush_metrics(metrics: telemetry.RpcMetrics) -> None:
    while True:
        await asyncio.sleep(metrics.FLUSH_SECONDS)
        try:
            metrics.flush()
        except Exception:  # metrics must never take the server down
            log.exception("flushing RPC metrics failed")


def _tune_for_latency() -> None:
    """Once a serving process has started (only there: these settings are process-wide).
    Everything loaded so far (modules, definitions, models) is long-lived, so the collector need
    never scan it again (a full collection over it is a pause of tens of ms). Threads beside the
    event loop (grpc's poller, the prediction log, heartbeats, store reads) may hold the GIL for
    at most 0.5 ms before the loop gets it back (the default is 5 ms, which shows in p99)."""
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(0.0005)


BATCH_HELPERS_ENV = "STRATA_BATCH_HELPER_THREADS"


def batch_helper_threads(loop_tid: int) -> None:
    """Every thread of this process but the event loop's runs as SCHED_BATCH. grpc's threads (its event-engine I/O pool, the completion-queue poller), store
    reads in worker threads and ONNX Runtime's pool wake several times per call; as normal
    threads on the serving process's core each wake-up preempts the interpreter mid-call (about
    20 % of the process's samples went to context switches). A SCHED_BATCH thread never preempts
    on wake-up: it runs when the loop waits (between calls, on every Redis round trip) or at the
    next scheduler tick, and keeps its fair share. Measured on two cores, three pairs each:
    features 100 x 20 CPU per call -11 to -19 % at 8x1 and 1x8, p99 at 1x8 5.0-6.0 -> 3.9-4.2 ms;
    inference b1 8x1 362 -> 306-319 us per request (docs/performance.md)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux
        return
    for tid in tids:
        if tid == loop_tid:
            continue
        try:
            if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # the thread ended meanwhile
            pass


async def _keep_helper_threads_batched() -> None:
    """Threads start later too (worker threads on first use, grpc's pool grows), so the scan
    repeats every second: a few syscalls for a dozen threads."""
    loop_tid = threading.get_native_id()
    while True:
        batch_helper_threads(loop_tid)
        await asyncio.sleep(1.0)


def run(build: Callable[[], Service]) -> None:
    """Entry point of `python -m services.<name>`: settings errors end the process with a
    clear message, the loop is uvloop when installed."""
    try:
        import uvloop
        runner: Callable[[Awaitable[None]], None] = uvloop.run  # type: ignore[assignment]
    except ImportError:  # pragma: no cover
        runner = asyncio.run

    async def main() -> None:
        svc = build()
        telemetry.setup_logging(svc.settings.log_level, svc.settings.log_format)
        telemetry.setup_tracing(svc.settings.service, svc.settings.tracing, svc.settings.otlp_endpoint)
        svc.on_start.append(_tune_for_latency)
        helpers = None
        if os.environ.get(BATCH_HELPERS_ENV, "on") != "off" and hasattr(os, "SCHED_BATCH"):
            helpers = asyncio.ensure_future(_keep_helper_threads_batched())
        try:
            await serve(svc)
        finally:
            if helpers is not None:
                helpers.cancel()

    runner(main())

