"""Client channels to Strata services: the bearer token added to every call, optional TLS,
message size limits matching the servers'."""

from __future__ import annotations

from pathlib import Path

import grpc

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


def open_channel(addr: str, token: str | None = None, tls_ca: Path | None = None) -> tuple[grpc.Channel, grpc.Channel]:
    """(the raw channel to close, the channel to build stubs on)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    if tls_ca is not None:
        raw = grpc.secure_channel(addr, grpc.ssl_channel_credentials(tls_ca.read_bytes()), options)
    else:
        raw = grpc.insecure_channel(addr, options)
    return raw, (grpc.intercept_channel(raw, _Auth(token)) if token else raw)
