"""A registry with test models and an inference service, as real processes on loopback."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from strata.inference.v1 import inference_pb2 as pb
from strata.inference.v1 import inference_pb2_grpc

from services.clients.registry import RegistryClient
from tests.inference import models
from tests.processes import free_port, start_service, stop_process


@dataclass
class Registry:
    addr: str
    artifacts: dict[tuple[str, int], bytes]


@pytest.fixture(scope="package")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    home = tmp_path_factory.mktemp("registry")
    port = free_port()
    proc = start_service("registry", home, port, {"STRATA_AUTH": "disabled"})
    addr = f"127.0.0.1:{port}"
    artifacts: dict[tuple[str, int], bytes] = {}
    versions = {"mlp": [models.mlp(seed=0), models.mlp(seed=1), models.mlp(seed=2)],
                "slow": [models.slow()], "flaky": [models.fails_when_large()], "fixed": [models.fixed_batch()]}
    with RegistryClient(addr) as client:
        for name, blobs in versions.items():
            for i, blob in enumerate(blobs):
                path = home / f"{name}-{i + 1}.onnx"
                path.write_bytes(blob)
                mv = client.register_onnx(name, path, create_model=(i == 0))
                artifacts[(name, mv.version)] = blob
    try:
        yield Registry(addr, artifacts)
    finally:
        stop_process(proc)


@dataclass
class Inference:
    addr: str
    home: Path
    proc: subprocess.Popen
    metrics_port: int = 0

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.addr)

    def stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channel())


def start_inference(registry: Registry, home: Path, workers: int = 1, **env: str) -> Inference:
    port, metrics = free_port(), free_port()
    proc = start_service("inference", home, port, {
        "STRATA_AUTH": "disabled", "STRATA_REGISTRY_ADDR": registry.addr, "STRATA_INFERENCE_METRICS_PORT": str(metrics),
        "STRATA_INFERENCE_WORKERS": str(workers), "STRATA_INFERENCE_POLL_SECONDS": "0.05", **env})
    return Inference(f"127.0.0.1:{port}", home, proc, metrics)


@pytest.fixture(scope="package")
def inference(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    # Batch jobs may name the tests' own files (tmp paths), nothing else on the host.
    srv = start_inference(registry, tmp_path_factory.mktemp("inference"),
                          STRATA_INFERENCE_BATCH_PATHS=str(tmp_path_factory.getbasetemp()))
    try:
        yield srv
    finally:
        stop_process(srv.proc)


def policy(*targets: tuple[str, int, int], **kw: object) -> pb.TrafficPolicy:
    return pb.TrafficPolicy(targets=[pb.Target(model=m, version=v, weight=w) for m, v, w in targets], **kw)
