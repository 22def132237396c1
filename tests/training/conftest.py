"""Fixtures of the training tests: bundled scikit-learn datasets written as Parquet tables into an
artifact store, and a platform of real processes (registry, features, training and its workers)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.processes import free_port, start_service, stop_process


def write_table(path: Path, columns: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def breast_cancer(path: Path) -> Path:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    cols = {n.replace(" ", "_"): d.data[:, i] for i, n in enumerate(d.feature_names)}
    return write_table(path, {**cols, "target": d.target})


def diabetes(path: Path) -> Path:
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    return write_table(path, {**{n: d.data[:, i] for i, n in enumerate(d.feature_names)}, "target": d.target})


@dataclass
class Platform:
    home: Path
    registry_addr: str
    training_addr: str
    env: dict[str, str]
    procs: list

    @property
    def store(self) -> Path:
        return self.home / "artifacts"

    def training(self):
        from strata.training.v1 import training_pb2_grpc

        return training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(self.training_addr))

    def features(self):  # noqa: ANN201
        from strata.features.v1 import features_pb2_grpc

        return features_pb2_grpc.FeatureServiceStub(grpc.insecure_channel(self.env["STRATA_FEATURES_ADDR"]))

    def registry(self):
        from strata.registry.v1 import registry_pb2_grpc

        return registry_pb2_grpc.RegistryServiceStub(grpc.insecure_channel(self.registry_addr))

    def start_worker(self) -> object:
        import subprocess
        import sys

        from tests.processes import ROOT

        log = open(self.home / "worker.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "services.training.worker"], cwd=ROOT,
                                env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc


def start_platform(home: Path, *, workers: int, extra: dict[str, str] | None = None) -> Platform:
    rp, fp, tp = free_port(), free_port(), free_port()
    env = {"STRATA_HOME": str(home), "STRATA_AUTH": "disabled", "STRATA_REGISTRY_ADDR": f"127.0.0.1:{rp}",
           "STRATA_FEATURES_ADDR": f"127.0.0.1:{fp}",
           "STRATA_TRAINING_ADDR": f"127.0.0.1:{tp}", "STRATA_TRAINING_LEASE_SECONDS": "4",
           "STRATA_TRAINING_POLL_SECONDS": "0.2", "STRATA_TRAINING_WORKERS": str(workers),
           "STRATA_TRAINING_THREADS_PER_WORKER": "1", **(extra or {})}
    procs = [start_service("registry", home, rp, env)]
    try:
        procs.append(start_service("features", home, fp, env))
        procs.append(start_service("training", home, tp, env))
    except BaseException:
        for proc in procs:
            stop_process(proc)
        raise
    return Platform(home, f"127.0.0.1:{rp}", f"127.0.0.1:{tp}", env, procs)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    p = start_platform(tmp_path_factory.mktemp("training"), workers=1)
    try:
        yield p
    finally:
        for proc in reversed(p.procs):
            stop_process(proc)
