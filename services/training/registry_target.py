"""The registry as the training runner sees it (runner.ModelRegistry), over gRPC: the champion's
ONNX file by alias, and the registration of a candidate (chunked upload with sha256, lineage, the
candidate's alias)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
from strata.registry.v1 import registry_pb2 as rpb

from services.clients.registry import RegistryClient
from services.training.runner import Champion, Lineage


class GrpcModelRegistry:
    def __init__(self, connect: Callable[[], RegistryClient]) -> None:
        self.connect = connect

    def champion(self, model: str, alias: str) -> Champion | None:
        with self.connect() as client:
            try:
                mv = client.resolve(model, alias=alias)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:  # no such model, or no such alias yet
                    return None
                raise
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "champion.onnx"
                client.download_artifact(model, mv.version, path)
                return Champion(mv.version, path.read_bytes())

    def register(self, model: str, onnx_path: Path, *, metrics: dict[str, float], tags: dict[str, str],
                 lineage: Lineage, request_id: str, alias: str) -> int:
        with self.connect() as client:
            mv = client.register_onnx(
                model, onnx_path, create_model=True, description=f"trained by training job {lineage.training_job_id}",
                metrics=metrics, tags=tags, request_id=request_id,
                lineage=rpb.Lineage(mlflow_run_id=lineage.mlflow_run_id, training_job_id=lineage.training_job_id,
                                    feature_views=list(lineage.feature_views), dataset_hash=lineage.dataset_hash,
                                    dataset_uri=lineage.dataset_uri, feature_set=lineage.feature_set,
                                    features=list(lineage.features)))
            client.stub.SetModelAlias(rpb.SetModelAliasRequest(name=model, alias=alias, version=mv.version))
            return mv.version
