"""Requests that do not decode, through the shared server bootstrap (a registry in-process):
INVALID_ARGUMENT with a plain message for unary, server-streaming and client-streaming methods
alike, never UNKNOWN "Unexpected <class ...DecodeError>"; the server keeps serving; a refused
mutating call is audited like any other refusal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from strata.registry.v1 import registry_pb2 as pb
from strata.registry.v1 import registry_pb2_grpc

from services.common.auth import mint_token
from services.common.server import serve
from services.common.settings import ServiceSettings
from services.registry.app import build_service
from tests.processes import free_port

SECRET = "decoding-test-secret-0123456789abcdef0123"
SERVICE = "/strata.registry.v1.RegistryService"
CORRUPT = b"\x0a\x05ab"            # field 1 (name) says 5 bytes, 2 follow
BAD_UTF8 = b"\x0a\x02\xff\xfe"     # field 1 (name) holds bytes that are not UTF-8


@pytest.fixture()
async def addr(tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    settings = ServiceSettings.for_service("registry", home=tmp_path, host="127.0.0.1", port=port, metrics_port=0,
                                           jwt_secret=SECRET)
    started, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(build_service(settings), started, stop))
    await asyncio.wait_for(started.wait(), 20)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _md(*roles: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(SECRET, 'mallory', list(roles))}"),)


def _assert_plain_invalid_argument(err: grpc.aio.AioRpcError) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    details = err.details() or ""
    assert "does not decode" in details, details
    assert "class" not in details and "DecodeError" not in details and "Unexpected" not in details, details


@pytest.mark.parametrize("payload", [CORRUPT, BAD_UTF8], ids=["corrupt", "invalid-utf8"])
async def test_undecodable_unary_request_is_invalid_argument(addr: str, payload: bytes) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        call = ch.unary_unary(f"{SERVICE}/GetRegisteredModel")  # no serializers: bytes as they are
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(payload, metadata=_md("viewer"))
        _assert_plain_invalid_argument(err.value)
        assert "strata.registry.v1.GetRegisteredModelRequest" in err.value.details()
        # The server keeps serving, and a well-formed call is answered as usual.
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="nope"), metadata=_md("viewer"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_undecodable_request_of_a_server_streaming_method(addr: str) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        call = ch.unary_stream(f"{SERVICE}/DownloadArtifact")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call(BAD_UTF8, metadata=_md("viewer")):
                pass
        _assert_plain_invalid_argument(err.value)


async def test_undecodable_message_of_a_client_streaming_method(addr: str) -> None:
    # Server reflection is the one bidirectional method every service has; its handler is
    # wrapped like the service's own.
    async with grpc.aio.insecure_channel(addr) as ch:
        call = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call(iter([b"\xff\xff\xff\xff"])):
                pass
        _assert_plain_invalid_argument(err.value)


async def test_an_undecodable_mutating_call_is_checked_for_its_role_and_audited(addr: str) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        create = ch.unary_unary(f"{SERVICE}/CreateRegisteredModel")
        with pytest.raises(grpc.aio.AioRpcError) as err:  # authentication and roles come first
            await create(CORRUPT, metadata=_md("viewer"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(CORRUPT, metadata=_md("developer"))
        _assert_plain_invalid_argument(err.value)
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        events = (await stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=_md("approver"))).audit_events
        outcomes = [(e.method.rsplit("/", 1)[-1], e.outcome) for e in events]
        assert ("CreateRegisteredModel", "INVALID_ARGUMENT") in outcomes, outcomes
