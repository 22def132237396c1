"""Fixtures of the monitoring tests: ONNX models with the signatures the platform's models have
(one [rows, 1] input per feature; a classifier's `label` and `probabilities`), prediction log
records as the inference service encodes them, Arrow batches, and a
platform of real processes (a registry and the monitoring service) on SQLite or PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.common.db import Database
from tests.conftest import PG_ADMIN
from tests.processes import free_port, start_service, stop_process

FEATURES = [f"txn__f{i}" for i in range(4)]


def classifier_onnx(features: list[str] = FEATURES, classes: int = 2) -> bytes:
    """label = argmax(softmax(x @ W)), probabilities = softmax(x @ W); one [rows, 1] input per feature."""
    w = numpy_helper.from_array(np.random.default_rng(3).standard_normal((len(features), classes)).astype(np.float32),
                                "W")
    nodes = [helper.make_node("Concat", features, ["x"], axis=1), helper.make_node("MatMul", ["x", "W"], ["z"]),
             helper.make_node("Softmax", ["z"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["z"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(
        nodes, "classifier", [helper.make_tensor_value_info(f, TensorProto.FLOAT, [None, 1]) for f in features],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def records(request_ids: list[str], features: dict[str, np.ndarray], outputs: dict[str, np.ndarray], *,
            endpoint: str = "fraud", model: str = "fraud-model", version: int = 1, shadow: bool = False,
            times: list[float] | None = None) -> list:
    """Prediction log records as the inference service writes them (its Encoder), one per id; the
    arrays have one row per record, or `rows` rows each when they are `rows` times longer."""
    from strata.inference.v1 import inference_pb2 as ipb

    from services.inference.predlog_format import Encoder

    enc = Encoder()
    n = len(request_ids)
    per = next(iter(features.values())).shape[0] // n
    now = time.time()
    out = []
    for i, rid in enumerate(request_ids):
        rows = slice(i * per, (i + 1) * per)
        inputs = {k: v[rows].reshape(per, 1).astype(np.float32) for k, v in features.items()}
        outs = [(k, v[rows]) for k, v in outputs.items()]
        entry = ((times[i] if times else now), rid, endpoint, model, version, 1, shadow, 1.0, inputs, outs, "")
        out.append(ipb.PredictionRecord.FromString(enc.encode(entry)))
    return out


def arrow_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    """The monitoring service's database, migrated, on SQLite or PostgreSQL (`database_url`)."""
    from services.monitoring.app import MIGRATIONS

    d = Database(database_url)
    d.migrate(MIGRATIONS)
    yield d
    d.dispose()


@dataclass
class Platform:
    home: Path
    registry_addr: str
    monitoring_addr: str
    env: dict[str, str]
    procs: dict[str, object]

    @property
    def store(self) -> Path:
        return self.home / "artifacts"

    def monitoring(self):  # noqa: ANN201
        from strata.monitoring.v1 import monitoring_pb2_grpc

        return monitoring_pb2_grpc.MonitoringServiceStub(grpc.insecure_channel(self.monitoring_addr))

    def registry(self):  # noqa: ANN201
        from services.clients.registry import RegistryClient

        return RegistryClient(self.registry_addr)

    def restart_monitoring(self, kill: bool = False) -> None:
        proc = self.procs["monitoring"]
        if kill:
            proc.kill()  # type: ignore[attr-defined]
            proc.wait()  # type: ignore[attr-defined]
        else:
            stop_process(proc)  # type: ignore[arg-type]
        port = int(self.monitoring_addr.rsplit(":", 1)[1])
        self.procs["monitoring"] = start_service("monitoring", self.home, port, self.env)


def start_platform(home: Path, database_url: str, extra: dict[str, str] | None = None) -> Platform:
    rp, mp = free_port(), free_port()
    env = {"STRATA_HOME": str(home), "STRATA_AUTH": "disabled", "STRATA_REGISTRY_ADDR": f"127.0.0.1:{rp}",
           "STRATA_MONITORING_DATABASE_URL": database_url, "STRATA_MONITORING_COMPACT_SECONDS": "0.5", **(extra or {})}
    procs: dict[str, object] = {"registry": start_service("registry", home, rp, env)}
    try:
        procs["monitoring"] = start_service("monitoring", home, mp, env)
    except BaseException:
        stop_process(procs["registry"])  # type: ignore[arg-type]
        raise
    return Platform(home, f"127.0.0.1:{rp}", f"127.0.0.1:{mp}", env, procs)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def platform(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """A registry and the monitoring service sharing STRATA_HOME (so one artifact store), the
    monitoring database on SQLite or on PostgreSQL (a database of its own, dropped afterwards)."""
    home = tmp_path_factory.mktemp("monitoring")
    name = ""
    if request.param == "sqlite":
        url = f"sqlite:///{home / 'monitoring.db'}"
    else:
        reason = request.getfixturevalue("pg_unavailable")
        if reason:
            pytest.skip(reason)
        import psycopg

        name = f"strata_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    p = start_platform(home, url)
    try:
        yield p
    finally:
        for proc in reversed(list(p.procs.values())):
            stop_process(proc)  # type: ignore[arg-type]
        if name:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
