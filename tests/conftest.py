"""Fixtures shared by the test suites: databases (SQLite file, PostgreSQL on 127.0.0.1:5432), an
S3 endpoint and small ONNX models."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.processes import free_port, stop_process

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"


def _pg_available() -> str | None:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=2):
            return None
    except psycopg.OperationalError as e:
        return f"PostgreSQL is not reachable on 127.0.0.1:5432 ({str(e).strip().splitlines()[0]})"


@pytest.fixture(scope="session")
def pg_unavailable() -> str | None:
    return _pg_available()


@pytest.fixture
def postgres_url(pg_unavailable: str | None) -> Iterator[str]:
    """A fresh PostgreSQL database per test, dropped afterwards."""
    if pg_unavailable:
        pytest.skip(pg_unavailable)
    import psycopg

    name = f"strata_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:  # noqa: ANN001
    """The same suite on the embedded default and on the production database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("postgres_url")


@contextmanager
def moto_server() -> Iterator[str]:
    """An S3 server for as long as the block runs; yields host:port. No MinIO server package
    exists in the package registries we can use, so this is moto's standalone S3-compatible
    server; minio and pyarrow speak the same S3 API to it as they would to MinIO or AWS."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with code {proc.returncode}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("moto server did not answer within 30 s")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc, timeout=10)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """host:port of an S3 server (moto_server) running for the whole session."""
    with moto_server() as endpoint:
        yield endpoint


def make_onnx_model(n_inputs: int = 4, n_outputs: int = 2, pad_bytes: int = 0) -> bytes:
    """A valid y = x @ W model; pad_bytes grows W (extra output columns) to reach a file size."""
    cols = n_outputs + max(0, pad_bytes // (4 * n_inputs))
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((n_inputs, cols), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
