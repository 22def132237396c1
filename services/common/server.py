"""The one server bootstrap every service uses.

`run(build)` starts a grpc.aio server with: the Strata interceptor, wrapped around each method
handler at registration (request id, tracing, authentication, role check from the method's
declared AccessPolicy, domain error -> status mapping, metrics, access log, audit record for
mutating calls), gRPC health checking, server
reflection, message size limits, optional TLS/mTLS, a Prometheus endpoint, and a graceful
shutdown on SIGTERM/SIGINT that stops taking calls and lets in-flight ones finish.

The interceptor is in `interceptor.py`; the process-wide latency settings that `run` applies
once a serving process has started are in `process_tuning.py`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from services.common import reuseport, telemetry
from services.common.audit import AuditLog
from services.common.auth import Authenticator
from services.common.interceptor import StrataInterceptor
from services.common.policy import MethodPolicy, policies_for
from services.common.process_tuning import BATCH_HELPERS_ENV, _keep_helper_threads_batched, _tune_for_latency
from services.common.reflection import add_reflection
from services.common.settings import ServiceSettings

log = logging.getLogger("strata.server")


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
