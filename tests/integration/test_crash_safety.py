"""Killing the registry (SIGKILL) during an upload or its commit leaves no visible partial
artifact and no version pointing at a missing file; after a restart the same upload resumes
(acknowledged chunks survive) and its commit makes the version READY."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc
import pytest
from strata.registry.v1 import registry_pb2 as pb

from services.clients.registry import RegistryClient
from tests.conftest import make_onnx_model
from tests.processes import free_port, start_service, stop_process

CHUNK = 1 << 20


def _start(home: Path, port: int):  # noqa: ANN202
    return start_service("registry", home, port, {"STRATA_AUTH": "disabled"})


def _artifact_files(home: Path) -> list[Path]:
    root = home / "artifacts" / "models"
    return [f for f in root.rglob("*") if f.is_file()] if root.exists() else []


def _assert_consistent(client: RegistryClient, home: Path, name: str, data: bytes) -> pb.ModelVersion | None:
    """Either the version is invisible (NOT_FOUND: not committed yet) and no artifact file is
    partial, or it is READY with a complete artifact that downloads byte-exact and is the only
    file in the artifact tree."""
    try:
        v = client.resolve(name, 1)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        # A commit killed after publishing leaves the whole object for the re-commit to record;
        # never a partial one (temp files of an interrupted publish are removed at start-up).
        assert all(f.read_bytes() == data for f in _artifact_files(home))
        assert client.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name=name)).registered_model \
            .latest_version == 0
        return None
    assert v.status == pb.MODEL_VERSION_STATUS_READY
    assert v.artifact.sha256 == hashlib.sha256(data).hexdigest()
    got = b"".join(b.data for b in client.stub.DownloadArtifact(pb.DownloadArtifactRequest(name=name, version=1)))
    assert got == data
    assert [f.name for f in _artifact_files(home)] == ["model.onnx"]
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
            assert _assert_consistent(c, home, "crash-upload", data) is None  # nothing visible yet
            # Every acknowledged chunk survived the crash: the client resumes where it stopped.
            up = c.stub.GetArtifactUpload(pb.GetArtifactUploadRequest(upload_id=upload_id)).upload
            assert up.received_bytes == 4 * CHUNK
            _append(c, upload_id, data, start=up.received_bytes)
            v = c.stub.CommitArtifactUpload(pb.CommitArtifactUploadRequest(upload_id=upload_id)).model_version
            assert v.status == pb.MODEL_VERSION_STATUS_READY
            _assert_consistent(c, home, "crash-upload", data)
    finally:
        stop_process(proc)


def _kill_when(proc, moment: str, home: Path) -> None:  # noqa: ANN001
    """SIGKILL the registry at a moment of the commit: a fixed delay into it, or as soon as the
    publish has started (its temp file appears) or has finished (the final file appears)."""
    if moment.startswith("after-"):
        time.sleep(float(moment.removeprefix("after-").removesuffix("s")))
    else:
        root = home / "artifacts" / "models"
        wanted = (lambda f: f.name.startswith(".tmp-")) if moment == "publishing" else (lambda f: f.name == "model.onnx")
        deadline = time.monotonic() + 60
        while not (root.exists() and any(wanted(f) for f in root.rglob("*"))):
            assert time.monotonic() < deadline, f"the commit never reached {moment!r}"
            time.sleep(0.001)
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("moment", ["after-0.02s", "after-0.08s", "after-0.2s", "publishing", "published"])
def test_kill_during_commit_keeps_the_upload_and_a_recommit_makes_it_ready(tmp_path: Path, moment: str) -> None:
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
        _kill_when(proc, moment, home)  # somewhere in hashing, validation, publishing or recording
        t.join(30)
    proc = _start(home, port)
    try:
        with RegistryClient(f"127.0.0.1:{port}") as c:
            if _assert_consistent(c, home, "crash-commit", data) is None:
                # The commit did not finish: the upload survived with every acknowledged byte,
                # and committing it again (what a client does after UNAVAILABLE) completes it.
                up = c.stub.GetArtifactUpload(pb.GetArtifactUploadRequest(upload_id=upload_id)).upload
                assert up.received_bytes == up.size_bytes == len(data)
                v = c.stub.CommitArtifactUpload(pb.CommitArtifactUploadRequest(upload_id=upload_id)).model_version
                assert v.status == pb.MODEL_VERSION_STATUS_READY
                assert _assert_consistent(c, home, "crash-commit", data) is not None
            else:  # the commit won before the kill: the upload is gone, as after any commit
                with pytest.raises(grpc.RpcError) as e:
                    c.stub.GetArtifactUpload(pb.GetArtifactUploadRequest(upload_id=upload_id))
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert not (home / "artifacts" / ".staging").exists() or \
                not any((home / "artifacts" / ".staging").iterdir())
    finally:
        stop_process(proc)
