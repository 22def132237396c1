"""Client channels to Strata services, the one place every client inside the platform gets them
(service to service, `strata up`'s health probes, the CLI, the demo): the bearer token added to
every call, message size limits matching the servers', and TLS/mTLS as the STRATA_TLS_* settings
say (`ClientTLS`; Envoy's upstream clusters are rendered from the same object)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.settings import TLSSettings

MAX_MESSAGE = 32 << 20


class _Auth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._md = (("authorization", f"Bearer {token}"),)

    def _add(self, details):  # noqa: ANN001, ANN202 - grpc's ClientCallDetails
        return details._replace(metadata=tuple(details.metadata or ()) + self._md)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._add(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._add(details), request)


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
    """(the raw channel to close, the channel to build stubs on). TLS follows the STRATA_TLS_*
    settings (`ClientTLS.from_settings`); `tls_ca` forces TLS with that CA."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    tls = ClientTLS.from_settings(ca_file=tls_ca)
    if tls is not None:
        raw = grpc.secure_channel(addr, tls.credentials(), options)
    else:
        raw = grpc.insecure_channel(addr, options)
    return raw, (grpc.intercept_channel(raw, _Auth(token)) if token else raw)


def open_aio_channel(addr: str, token: str | None = None, *, own_connection: bool = False
                     ) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    """An asyncio channel for calls made from a service's event loop (TLS as `open_channel`), and
    the metadata to send with each call (the bearer token: per call, cheaper than an interceptor).
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
