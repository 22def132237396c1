"""The Strata interceptor: everything cross-cutting about a call, wrapped around each method
handler once, at registration (`server.py`'s `_Registrar`): request id, tracing, authentication,
role check from the method's declared AccessPolicy, domain error -> status mapping, metrics,
access log, audit record for mutating calls; plus the request deserializer that turns bytes that
do not decode into INVALID_ARGUMENT and the response serializer that lets a handler answer with
bytes already serialized.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.common import telemetry
from services.common.audit import AuditLog, AuditRecord, current_resource, request_resource
from services.common.auth import ANONYMOUS_ADMIN, Authenticator, Principal, current_principal
from services.common.errors import PermissionDenied, StrataError, UndecodableRequest
from services.common.policy import ROLE_NAMES, MethodPolicy, rank_of

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
        elif self._auth is None:  # STRATA_AUTH=disabled
            current_principal.set(ANONYMOUS_ADMIN)
        else:
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
        if request.__class__ is _Undecodable:  # after authentication: strangers learn nothing
            raise request.error

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
                    return await inner(request, context)
            start = time.perf_counter()
            self.metrics.in_flight += 1
            try:
                self._begin(method, policy, dict(context.invocation_metadata() or ()), request)
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
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write()
                    await result
        return behavior


_NOBODY = Principal("unauthenticated", frozenset())


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
