"""The shared server bootstrap in-process: tracing spans per RPC with the caller's trace
context, and the interceptor's handling of auth failures."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from strata.registry.v1 import registry_pb2 as pb
from strata.registry.v1 import registry_pb2_grpc

from services.common.auth import mint_token
from services.common.server import serve
from services.common.settings import ServiceSettings
from services.registry.app import build_service
from tests.processes import free_port

SECRET = "server-test-secret-0123456789abcdef0123"
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)  # once per process; this is the only test that sets it


async def test_each_rpc_is_a_span_joined_to_the_callers_trace(tmp_path: Path) -> None:
    port = free_port()
    settings = ServiceSettings.for_service("registry", home=tmp_path, host="127.0.0.1", port=port, metrics_port=0,
                                           jwt_secret=SECRET, tracing="console")
    started, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(build_service(settings), started, stop))
    await asyncio.wait_for(started.wait(), 20)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    token = mint_token(SECRET, "alice", ["viewer"])
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = registry_pb2_grpc.RegistryServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="nope"), metadata=(
                    ("authorization", f"Bearer {token}"), ("x-request-id", "req-123"),
                    ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ListRegisteredModels(pb.ListRegisteredModelsRequest())
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    get = spans["strata.registry.v1.RegistryService/GetRegisteredModel"]
    assert format(get.context.trace_id, "032x") == trace_id
    assert get.kind == trace.SpanKind.SERVER
    assert get.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert get.attributes["strata.request_id"] == "req-123"
    assert not get.status.is_ok
    listed = spans["strata.registry.v1.RegistryService/ListRegisteredModels"]
    assert listed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
