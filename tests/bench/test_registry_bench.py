"""Registry benchmarks over gRPC against a real registry process (SQLite, local artifacts, JWT
auth on). Run: make bench  (or: pytest tests/bench --benchmark-enable --benchmark-only)
Figures and the command are published in docs/performance.md."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from strata.registry.v1 import registry_pb2 as pb
from strata.registry.v1 import registry_pb2_grpc

from services.common.auth import mint_token
from tests.processes import free_port, start_service, stop_process

SECRET = "bench-secret-0123456789abcdef0123456789"
ARTIFACT_MB = 100
CHUNK = 4 << 20


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry_pb2_grpc.RegistryServiceStub]:
    home = tmp_path_factory.mktemp("bench-home")
    port = free_port()
    proc = start_service("registry", home, port, {"STRATA_JWT_SECRET": SECRET, "STRATA_LOG_LEVEL": "WARNING"})
    token = mint_token(SECRET, "bench", ["admin"])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    intercept = grpc.intercept_channel(channel, _AuthInterceptor(token))
    try:
        yield registry_pb2_grpc.RegistryServiceStub(intercept)
    finally:
        channel.close()
        stop_process(proc)


class _AuthInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._md = (("authorization", f"Bearer {token}"),)

    def _with_auth(self, details):  # noqa: ANN001
        return details._replace(metadata=tuple(details.metadata or ()) + self._md)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001
        return continuation(self._with_auth(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001
        return continuation(self._with_auth(details), request)


@pytest.fixture(scope="module")
def populated(stub: registry_pb2_grpc.RegistryServiceStub) -> str:
    """A model with 200 READY versions, each with metrics and an alias on one of them."""
    name = "bench-model"
    stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(
        name=name, tags={"team": "bench"})))
    data = b"not-onnx-" * 10
    digest = hashlib.sha256(data).hexdigest()
    for _ in range(200):
        v = stub.CreateModelVersion(pb.CreateModelVersionRequest(
            name=name, framework="other", metrics={"auc": 0.9, "loss": 0.1})).model_version
        up = stub.BeginArtifactUpload(pb.BeginArtifactUploadRequest(
            name=name, version=v.version, size_bytes=len(data), sha256=digest)).upload
        stub.AppendArtifactChunk(pb.AppendArtifactChunkRequest(upload_id=up.upload_id, offset=0, data=data))
        stub.CommitArtifactUpload(pb.CommitArtifactUploadRequest(upload_id=up.upload_id))
    stub.SetModelAlias(pb.SetModelAliasRequest(name=name, alias="challenger", version=100))
    return name


def test_get_model_version_latency(benchmark, stub, populated) -> None:  # noqa: ANN001
    req = pb.GetModelVersionRequest(name=populated, version=100)
    result = benchmark(stub.GetModelVersion, req)
    assert result.model_version.aliases == ["challenger"]


def test_list_model_versions_latency(benchmark, stub, populated) -> None:  # noqa: ANN001
    req = pb.ListModelVersionsRequest(name=populated, page_size=50)
    result = benchmark(stub.ListModelVersions, req)
    assert len(result.model_versions) == 50 and result.next_page_token


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("bench-data") / "artifact.bin"
    data = os.urandom(ARTIFACT_MB << 20)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _upload(stub: registry_pb2_grpc.RegistryServiceStub, name: str, path: Path, digest: str) -> pb.ModelVersion:
    v = stub.CreateModelVersion(pb.CreateModelVersionRequest(name=name, framework="other")).model_version
    size = path.stat().st_size
    up = stub.BeginArtifactUpload(pb.BeginArtifactUploadRequest(
        name=name, version=v.version, size_bytes=size, sha256=digest, filename="artifact.bin")).upload
    with open(path, "rb") as f:
        offset = 0
        while chunk := f.read(CHUNK):
            stub.AppendArtifactChunk(pb.AppendArtifactChunkRequest(upload_id=up.upload_id, offset=offset, data=chunk))
            offset += len(chunk)
    return stub.CommitArtifactUpload(pb.CommitArtifactUploadRequest(upload_id=up.upload_id)).model_version


def test_artifact_upload_throughput(benchmark, stub, big_file) -> None:  # noqa: ANN001
    path, digest = big_file
    stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(name="bench-up")))
    mv = benchmark.pedantic(_upload, args=(stub, "bench-up", path, digest), rounds=3, iterations=1)
    assert mv.artifact.sha256 == digest
    benchmark.extra_info["MB_per_s"] = round(ARTIFACT_MB / benchmark.stats.stats.mean, 1)


def test_artifact_download_throughput(benchmark, stub, big_file) -> None:  # noqa: ANN001
    path, digest = big_file
    stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(name="bench-down")))
    mv = _upload(stub, "bench-down", path, digest)

    def download() -> str:
        h = hashlib.sha256()
        for body in stub.DownloadArtifact(pb.DownloadArtifactRequest(name="bench-down", version=mv.version)):
            h.update(body.data)
        return h.hexdigest()

    assert benchmark.pedantic(download, rounds=3, iterations=1) == digest
    benchmark.extra_info["MB_per_s"] = round(ARTIFACT_MB / benchmark.stats.stats.mean, 1)
