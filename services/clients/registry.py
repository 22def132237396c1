"""A small Python client of the registry on the generated stubs, shared by the inference service,
the CLI, the demo, tests and benchmarks: it adds the bearer token to every call and wraps the
multi-call flows (chunked upload, verified download)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import grpc
from strata.common.v1 import types_pb2
from strata.registry.v1 import registry_pb2 as pb
from strata.registry.v1 import registry_pb2_grpc

from services.common.client import open_channel

CHUNK_BYTES = 4 << 20


def _check_onnx(path: Path) -> None:
    """ValueError naming the file when it is not a valid ONNX model (the registry's own check)."""
    import onnx  # only registering needs it

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - onnx raises DecodeError, ValidationError, ...
        raise ValueError(f"{path}: not a valid ONNX model: {str(e).splitlines()[0][:300]}") from None


def _sha256_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class RegistryClient:
    def __init__(self, addr: str, token: str | None = None, tls_ca: Path | None = None) -> None:
        self._channel, channel = open_channel(addr, token, tls_ca)
        self.stub = registry_pb2_grpc.RegistryServiceStub(channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- flows ---------------------------------------------------------------------------------
    def upload_artifact(self, name: str, version: int, path: Path, chunk_size: int = CHUNK_BYTES,
                        *, hashed: tuple[str, int] | None = None) -> pb.ModelVersion:
        """Upload a file in chunks (never read whole) and commit it; the server checks sha256.
        `hashed` is (sha256, size) when the caller has already read the file."""
        digest, size = hashed or _sha256_file(path)
        upload = self.stub.BeginArtifactUpload(pb.BeginArtifactUploadRequest(
            name=name, version=version, size_bytes=size, sha256=digest, filename=path.name)).upload
        try:
            with open(path, "rb") as f:
                offset = 0
                while chunk := f.read(chunk_size):
                    self.stub.AppendArtifactChunk(pb.AppendArtifactChunkRequest(
                        upload_id=upload.upload_id, offset=offset, data=chunk))
                    offset += len(chunk)
            return self.stub.CommitArtifactUpload(
                pb.CommitArtifactUploadRequest(upload_id=upload.upload_id)).model_version
        except BaseException:
            try:  # leave nothing staged behind; the server discards a failed commit itself
                self.stub.AbortArtifactUpload(pb.AbortArtifactUploadRequest(upload_id=upload.upload_id))
            except grpc.RpcError:
                pass
            raise

    def register_onnx(self, name: str, path: Path, *, create_model: bool = False, description: str = "",
                      metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
                      lineage: pb.Lineage | None = None, request_id: str = "",
                      allow_nan: bool = False) -> pb.ModelVersion:
        """Create (optionally the model and) a version, upload the .onnx file, commit. The file
        is read first, so a missing or unreadable one creates nothing; any later failure leaves
        only a draft the registry never shows (a retry with the same request_id resumes it).
        `allow_nan`: the model takes NaN and infinities in its inputs (inference refuses them
        otherwise)."""
        hashed = _sha256_file(path)
        if create_model:
            # The registry validates the file at commit; checking it here first keeps a bad file
            # from leaving a new, empty model behind (deleting a model needs the admin role).
            _check_onnx(path)
            try:
                self.stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(
                    registered_model=pb.RegisteredModel(name=name)))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
        version = self.stub.CreateModelVersion(pb.CreateModelVersionRequest(
            name=name, framework="onnx", description=description, metrics=metrics or {}, tags=tags or {},
            lineage=lineage, request_id=request_id,
            signature=types_pb2.ModelSignature(allow_nan=allow_nan))).model_version
        if version.status == pb.MODEL_VERSION_STATUS_READY:  # a retried request_id: already done
            return version
        return self.upload_artifact(name, version.version, path, hashed=hashed)

    def resolve(self, name: str, version: int = 0, alias: str = "") -> pb.ModelVersion:
        if alias:
            return self.stub.GetModelVersionByAlias(pb.GetModelVersionByAliasRequest(name=name, alias=alias)).model_version
        return self.stub.GetModelVersion(pb.GetModelVersionRequest(name=name, version=version)).model_version

    def download_artifact(self, name: str, version: int, dest: Path) -> pb.ModelVersion:
        """Stream the artifact to a temp file beside dest, verify sha256, then rename into place."""
        mv = self.resolve(name, version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for body in self.stub.DownloadArtifact(pb.DownloadArtifactRequest(name=name, version=version)):
                    h.update(body.data)
                    out.write(body.data)
            if h.hexdigest() != mv.artifact.sha256:
                raise ValueError(f"sha256 mismatch: registry says {mv.artifact.sha256}, received {h.hexdigest()}")
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return mv

    def list_all_models(self, **filters: object) -> Iterable[pb.RegisteredModel]:
        token = ""
        while True:
            page = self.stub.ListRegisteredModels(pb.ListRegisteredModelsRequest(page_token=token, **filters))
            yield from page.registered_models
            if not (token := page.next_page_token):
                return

    def list_all_promotions(self, name: str, state: int = 0) -> Iterable[pb.Promotion]:
        """Every promotion of a model (in one state, e.g. PROMOTION_STATE_APPROVED), newest first."""
        token = ""
        while True:
            page = self.stub.ListPromotions(pb.ListPromotionsRequest(name=name, state=state, page_size=500,
                                                                     page_token=token))
            yield from page.promotions
            if not (token := page.next_page_token):
                return

    def list_all_versions(self, name: str) -> Iterable[pb.ModelVersion]:
        token = ""
        while True:
            page = self.stub.ListModelVersions(pb.ListModelVersionsRequest(name=name, page_token=token))
            yield from page.model_versions
            if not (token := page.next_page_token):
                return
