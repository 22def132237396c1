"""Client channels to Strata services, the one place every client inside the platform gets them
(service to service, `strata up`'s health probes, the CLI, the demo): the bearer token added to
every call, message size limits matching the servers', TLS/mTLS as the STRATA_TLS_* settings
say (`ClientTLS`; Envoy's upstream clusters are rendered from the same object), and the trace
context of the call being handled (W3C traceparent/tracestate) on every call made while one is.

Tracing: a call made inside a valid span (a traced server call, STRATA_TRACING set) gets a CLIENT
span of its own, child of that span, and carries that span's context in its metadata, so the
callee's server span joins the same trace (services/common/interceptor.py extracts it). With
tracing off (`telemetry.TRACING`, set by `telemetry.setup_tracing`) or outside a span nothing is
added, and with tracing off the check is a module attribute read (`trace_metadata` ~0.08 us,
`unary` ~0.1-0.3 us over the bare awaited call). Synchronous channels get this from an
interceptor (`_Outgoing`, with the bearer token); asyncio calls, which carry their metadata per
call, go through `unary` (or `trace_metadata` for the metadata alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.common import telemetry
from services.common.settings import TLSSettings

MAX_MESSAGE = 32 << 20
Metadata = tuple[tuple[str, str], ...]

# A proxy until setup_tracing installs the SDK provider, then the SDK's tracer.
_tracer = trace.get_tracer("strata.client")


def _in_span() -> bool:
    """Whether this process traces and the caller is in a valid span (a traced call)."""
    return telemetry.TRACING and trace.get_current_span().get_span_context().is_valid


def _rpc_span(method: str | bytes) -> tuple[Span, Metadata]:
    """A CLIENT span for a call to `method` ("/pkg.Service/Method"), child of the current span, and
    the metadata that carries its context to the callee."""
    if isinstance(method, bytes):
        method = method.decode()
    service, _, name = method.lstrip("/").partition("/")
    span = _tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT, attributes={
        "rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, tuple(carrier.items())


def _end_rpc_span(span: Span, code: grpc.StatusCode | None, details: str | None = None) -> None:
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))
    span.end()


def trace_metadata(metadata: Metadata = ()) -> Metadata:
    """`metadata` plus the W3C trace context (traceparent, tracestate) of the current span; the
    same tuple, untouched, when there is no valid span (tracing off, or outside a traced call)."""
    if not _in_span():
        return metadata
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return metadata + tuple(carrier.items())


async def unary(multicallable: grpc.aio.UnaryUnaryMultiCallable, request: Any, metadata: Metadata,
                timeout: float | None = None) -> Any:
    """`await multicallable(request, metadata=metadata, timeout=timeout)` for a call on an asyncio
    channel (`open_aio_channel`), inside a CLIENT span that carries the trace context when the
    caller is in a valid span (see the module's docstring); otherwise just the call."""
    if not _in_span():
        return await multicallable(request, metadata=metadata, timeout=timeout)
    # The generated stub's method path ("/pkg.Service/Method"), a plain attribute of grpc.aio's
    # multicallables; a span named "grpc" if a later grpc renames it.
    span, context = _rpc_span(getattr(multicallable, "_method", b"/grpc"))
    try:
        response = await multicallable(request, metadata=metadata + context, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        _end_rpc_span(span, e.code(), e.details())
        raise
    except BaseException as e:  # cancelled (the caller's call ended), or not a gRPC failure
        _end_rpc_span(span, grpc.StatusCode.UNKNOWN if isinstance(e, Exception) else grpc.StatusCode.CANCELLED,
                      type(e).__name__)
        raise
    _end_rpc_span(span, grpc.StatusCode.OK)
    return response


class _Outgoing(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token (when there is one) and the trace context (inside a valid span: a
    CLIENT span per call, ended when the call finishes) to every call, whatever its shape (a
    client-streaming upload too)."""

    def __init__(self, token: str | None) -> None:
        self._md: Metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, continuation: Callable, details: Any, request: Any) -> Any:  # noqa: ANN401
        if not _in_span():
            if not self._md:
                return continuation(details, request)
            return continuation(details._replace(metadata=tuple(details.metadata or ()) + self._md), request)
        span, context = _rpc_span(details.method)
        try:
            call = continuation(details._replace(metadata=tuple(details.metadata or ()) + self._md + context),
                                request)
        except BaseException:
            _end_rpc_span(span, None)
            raise
        # A blocking call is over already (the callback runs at once), a future or a response
        # stream when it ends.
        call.add_done_callback(lambda done: _end_rpc_span(span, done.code(), done.details()))
        return call

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return self._call(continuation, details, request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return self._call(continuation, details, request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return self._call(continuation, details, request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return self._call(continuation, details, request_iterator)


@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies a Strata service and proves itself to it.

    `ca_file` None: the system's trusted roots. `cert_file`/`key_file`: the client certificate
    presented to services that require one (STRATA_TLS_CLIENT_CA_FILE on their side)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: TLSSettings | None = None, ca_file: Path | None = None) -> ClientTLS | None:
        """TLS from STRATA_TLS_* (None: plaintext). `ca_file` (e.g. the CLI's --tls-ca) turns TLS
        on with that CA whatever the settings say."""
        s = settings if settings is not None else TLSSettings()
        if ca_file is None and not s.client_tls:
            return None
        return cls(ca_file or s.tls_ca_file, s.tls_client_cert_file, s.tls_client_key_file)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None)


def open_channel(addr: str, token: str | None = None, tls_ca: Path | None = None) -> tuple[grpc.Channel, grpc.Channel]:
    """(the raw channel to close, the channel to build stubs on: the bearer token and the trace
    context added to each call). TLS follows the STRATA_TLS_* settings (`ClientTLS.from_settings`);
    `tls_ca` forces TLS with that CA."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    tls = ClientTLS.from_settings(ca_file=tls_ca)
    if tls is not None:
        raw = grpc.secure_channel(addr, tls.credentials(), options)
    else:
        raw = grpc.insecure_channel(addr, options)
    # Always intercepted: whether a call is traced is known per call (tracing may be set up after
    # the channel is opened, and the CLI's calls are in no span).
    return raw, grpc.intercept_channel(raw, _Outgoing(token))


def open_aio_channel(addr: str, token: str | None = None, *, own_connection: bool = False
                     ) -> tuple[grpc.aio.Channel, Metadata]:
    """An asyncio channel for calls made from a service's event loop (TLS as `open_channel`), and
    the metadata to send with each call (the bearer token: per call, cheaper than an interceptor;
    make the calls with `unary`, which adds the trace context, or pass `trace_metadata(md)`).
    `own_connection`: a TCP connection of its own (gRPC otherwise shares one between the channels
    of a process to the same address), so that calls spread over a peer's serving processes,
    which share their port and get connections, not calls, from the kernel."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    tls = ClientTLS.from_settings()
    channel = grpc.aio.secure_channel(addr, tls.credentials(), options) if tls is not None else \
        grpc.aio.insecure_channel(addr, options)
    return channel, ((("authorization", f"Bearer {token}"),) if token else ())
