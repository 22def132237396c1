"""Bounds and quoting in the registry: list filters beyond one bound per kind are INVALID_ARGUMENT
naming the field (a 60,000-character query used to reach SQLite as a LIKE pattern it refuses:
INTERNAL), versions past int32 likewise, errors quote request input short, and a signature's
allow_nan, declared at registration, survives the ONNX commit (which reads the tensors from the
graph). The domain on SQLite and PostgreSQL; the servicer over gRPC in-process."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from strata.common.v1 import types_pb2
from strata.registry.v1 import registry_pb2 as pb
from strata.registry.v1 import registry_pb2_grpc

from services.common.artifacts import LocalArtifactStore
from services.common.db import Database
from services.common.errors import InvalidArgument, NotFound
from services.common.limits import MAX_FILTER_TERMS, MAX_VERSION
from services.common.server import serve
from services.common.settings import ServiceSettings
from services.registry.app import MIGRATIONS, build_service
from services.registry.domain import Model, Registry
from services.registry.onnx_check import Signature
from tests.conftest import make_onnx_model
from tests.processes import free_port

MIB = 1 << 20


def _commit(r: Registry, name: str, signature: Signature | None = None) -> object:
    data = make_onnx_model()
    v = r.create_version(name, framework="onnx", principal="alice", signature=signature)
    up = r.begin_upload(name, v.version, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        filename="model.onnx", principal="alice")
    r.append_chunk(up.upload_id, 0, data)
    return r.commit_upload(up.upload_id)


def test_list_filters_are_bounded(registry: Registry) -> None:
    registry.create_model(Model(name="fraud", description="card fraud"), "alice")  # rows for LIKE to scan
    assert registry.list_models(query="a" * 1024)[0] == []
    for kwargs, field in (({"query": "a" * 60_000}, "query"), ({"query": "%" * 60_000}, "query"),
                          ({"owner": "o" * 60_000}, "owner"),
                          ({"tags": [f"k{i}" for i in range(5000)]}, "tags"),
                          ({"tags": ["team=" + "v" * 60_000]}, "tags[0]")):
        with pytest.raises(InvalidArgument) as err:
            registry.list_models(**kwargs)
        assert err.value.field == field, (kwargs.keys(), err.value.field)
    assert len(registry.list_models(tags=["team"] * MAX_FILTER_TERMS)[0]) == 0


def test_versions_past_int32_are_invalid_argument(registry: Registry) -> None:
    registry.create_model(Model(name="fraud"), "alice")
    for version in (MAX_VERSION + 1, 2**63 - 1, -1):
        with pytest.raises(InvalidArgument) as err:
            registry.get_version("fraud", version)
        assert err.value.field == "version"


def test_errors_quote_request_input_short(registry: Registry) -> None:
    for call in (lambda: registry.get_upload("u" * MIB), lambda: registry.abort_upload("u" * MIB),
                 lambda: registry.decide_promotion("p" * MIB, "bob", True, "")):
        with pytest.raises(NotFound) as err:
            call()
        assert len(err.value.message) < 300 and f"({MIB} characters)" in err.value.message, err.value.message
    with pytest.raises(InvalidArgument) as err:
        registry.get_model("m" * MIB)
    assert len(err.value.message) < 300 and f"({MIB} characters)" in err.value.message


def test_allow_nan_declared_at_registration_survives_the_onnx_commit(registry: Registry) -> None:
    registry.create_model(Model(name="fraud"), "alice")
    strict = _commit(registry, "fraud")
    assert strict.signature.allow_nan is False and [t.name for t in strict.signature.inputs] == ["x"]
    lenient = _commit(registry, "fraud", Signature(allow_nan=True))
    assert lenient.signature.allow_nan is True and [t.name for t in lenient.signature.inputs] == ["x"]
    assert registry.get_version("fraud", lenient.version).signature.allow_nan is True


# -- over gRPC -----------------------------------------------------------------------------------
@pytest.fixture()
async def stub(tmp_path: Path) -> AsyncIterator[registry_pb2_grpc.RegistryServiceStub]:
    port = free_port()
    settings = ServiceSettings.for_service("registry", home=tmp_path, host="127.0.0.1", port=port, metrics_port=0,
                                           auth="disabled")
    started, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(build_service(settings), started, stop))
    await asyncio.wait_for(started.wait(), 20)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield registry_pb2_grpc.RegistryServiceStub(ch)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_list_filters_over_grpc_name_the_field(stub: registry_pb2_grpc.RegistryServiceStub) -> None:
    await stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(name="m")))
    await stub.ListAuditEvents(pb.ListAuditEventsRequest(resource_prefix="models/m"))  # rows for LIKE to scan
    for call, field in ((stub.ListRegisteredModels(pb.ListRegisteredModelsRequest(query="q" * 60_000)), "query"),
                        (stub.ListAuditEvents(pb.ListAuditEventsRequest(resource_prefix="r" * 60_000)),
                         "resource_prefix"),
                        (stub.ListAuditEvents(pb.ListAuditEventsRequest(principal="p" * 60_000)), "principal")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith(f"{field}: "), err.value.details()


async def test_allow_nan_is_settable_at_registration_over_grpc(stub: registry_pb2_grpc.RegistryServiceStub) -> None:
    await stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(name="m")))
    data = make_onnx_model()
    v = (await stub.CreateModelVersion(pb.CreateModelVersionRequest(
        name="m", framework="onnx", signature=types_pb2.ModelSignature(allow_nan=True)))).model_version
    up = (await stub.BeginArtifactUpload(pb.BeginArtifactUploadRequest(
        name="m", version=v.version, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
        filename="m.onnx"))).upload
    await stub.AppendArtifactChunk(pb.AppendArtifactChunkRequest(upload_id=up.upload_id, offset=0, data=data))
    done = (await stub.CommitArtifactUpload(pb.CommitArtifactUploadRequest(upload_id=up.upload_id))).model_version
    assert done.signature.allow_nan and [t.name for t in done.signature.inputs] == ["x"]
    card = await stub.GetModelCard(pb.GetModelCardRequest(name="m", version=v.version))
    assert "NaN and infinities in inputs: accepted" in card.data.decode()
