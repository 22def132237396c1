"""Killing the registry (SIGKILL) during an upload or its commit leaves no visible partial
artifact and no version pointing at a missing file; after a restart the upload can be redone."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc
import pytest
from strata.registry.v1 import registry_pb2 as pb

from services.registry.client import RegistryClient
from tests.conftest import make_onnx_model
from tests.processes import free_port, start_service, stop_process

CHUNK = 1 << 20


def _start(home: Path, port: int):  # noqa: ANN202
    return start_service("registry", home, port, {"STRATA_AUTH": "disabled"})


def _artifact_files(home: Path) -> list[Path]:
    root = home / "artifacts" / "models"
    return [f for f in root.rglob("*") if f.is_file()] if root.exists() else []


def _assert_consistent(client: RegistryClient, home: Path, name: str, data: bytes) -> pb.ModelVersion:
    """Either no artifact at all, or a complete one that downloads byte-exact; and no file in
    the artifact tree that no version points at."""
    v = client.resolve(name, 1)
    files = _artifact_files(home)
    if v.status == pb.MODEL_VERSION_STATUS_READY:
        assert v.artifact.sha256 == hashlib.sha256(data).hexdigest()
        got = b"".join(b.data for b in client.stub.DownloadArtifact(pb.DownloadArtifactRequest(name=name, version=1)))
        assert got == data
        assert [f.name for f in files] == ["model.onnx"]
    else:
        assert v.status == pb.MODEL_VERSION_STATUS_PENDING_UPLOAD and not v.artifact.sha256
        assert files == []
    return v


def _begin(client: RegistryClient, name: str, data: bytes) -> str:
    client.stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(name=name)))
    client.stub.CreateModelVersion(pb.CreateModelVersionRequest(name=name, framework="onnx"))
    return client.stub.BeginArtifactUpload(pb.BeginArtifactUploadRequest(
        name=name, version=1, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
        filename="model.onnx")).upload.upload_id


def _append(client: RegistryClient, upload_id: str, data: bytes, start: int = 0, stop: int | None = None) -> None:
    for off in range(start, len(data) if stop is None else stop, CHUNK):
        client.stub.AppendArtifactChunk(pb.AppendArtifactChunkRequest(
            upload_id=upload_id, offset=off, data=data[off:off + CHUNK]))


def test_kill_during_upload_keeps_acknowledged_chunks_and_the_upload_resumes(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    data = make_onnx_model(pad_bytes=8 << 20)
    proc = _start(home, port)
    with RegistryClient(f"127.0.0.1:{port}") as c:
        upload_id = _begin(c, "crash-upload", data)
        _append(c, upload_id, data, stop=4 * CHUNK)
        proc.kill()
        proc.wait()
    proc = _start(home, port)
    try:
        with RegistryClient(f"127.0.0.1:{port}") as c:
            _assert_consistent(c, home, "crash-upload", data)  # nothing visible, version still pending
            # Every acknowledged chunk survived the crash: the client resumes where it stopped.
            up = c.stub.GetArtifactUpload(pb.GetArtifactUploadRequest(upload_id=upload_id)).upload
            assert up.received_bytes == 4 * CHUNK
            _append(c, upload_id, data, start=up.received_bytes)
            v = c.stub.CommitArtifactUpload(pb.CommitArtifactUploadRequest(upload_id=upload_id)).model_version
            assert v.status == pb.MODEL_VERSION_STATUS_READY
            _assert_consistent(c, home, "crash-upload", data)
    finally:
        stop_process(proc)


@pytest.mark.parametrize("delay", [0.02, 0.08, 0.2])
def test_kill_during_commit_never_leaves_a_dangling_or_partial_artifact(tmp_path: Path, delay: float) -> None:
    home, port = tmp_path / "home", free_port()
    data = make_onnx_model(pad_bytes=50 << 20)
    proc = _start(home, port)
    with RegistryClient(f"127.0.0.1:{port}") as c:
        upload_id = _begin(c, "crash-commit", data)
        _append(c, upload_id, data)

        def commit() -> None:
            try:
                c.stub.CommitArtifactUpload(pb.CommitArtifactUploadRequest(upload_id=upload_id))
            except grpc.RpcError:
                pass  # the server died under it: which outcome won is what the test checks

        t = threading.Thread(target=commit)
        t.start()
        time.sleep(delay)  # somewhere in hashing, validation, publishing or recording
        proc.kill()
        proc.wait()
        t.join(30)
    proc = _start(home, port)
    try:
        with RegistryClient(f"127.0.0.1:{port}") as c:
            v = _assert_consistent(c, home, "crash-commit", data)
            if v.status != pb.MODEL_VERSION_STATUS_READY:  # the commit lost: redo the upload
                path = tmp_path / "model.onnx"
                path.write_bytes(data)
                c.upload_artifact("crash-commit", 1, path)
                _assert_consistent(c, home, "crash-commit", data)
    finally:
        stop_process(proc)
