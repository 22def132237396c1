"""Batch jobs without the gRPC service: a real SQLite database migrated like the service's, real
Parquet/CSV files and a real ONNX Runtime session, scored results compared with onnxruntime run
directly on the same rows.

The model comes from `OneModel`, which stands in for ModelStore: it replaces only the registry
download and sha256 check (covered by the service tests) with a ModelRuntime built here."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from strata.inference.v1 import inference_pb2 as pb

from services.common.artifacts import LocalArtifactStore
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.inference import tables
from services.inference.batch_jobs.runner import BatchRunner
from services.inference.batch_jobs.store import (
    CANCELLED, FAILED, INTERRUPTED, PENDING, RUNNING, SUCCEEDED, BatchJobState, BatchJobStore,
)
from services.inference.batch_servicer import BatchJobsServicer, job_pb
from services.inference.model_store import LoadedModel, ModelRef
from services.inference.runtime import ModelRuntime
from tests.inference import models

MIGRATIONS = tables.MIGRATIONS  # as app.py (not imported: it wires the whole service)
FEATURES = [f"f{i}" for i in range(32)]


class OneModel:
    """ModelStore's resolve/load over one model built here ("mlp", newest version 3). It replaces
    the registry download and sha256 check, which the service tests cover."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime

    async def resolve(self, model: str, version: int = 0, alias: str = "") -> ModelRef:
        if model != "mlp":
            raise NotFound(f"models/{model} not found in the registry")
        return ModelRef(model, version or 3)

    async def load(self, ref: ModelRef) -> LoadedModel:
        return LoadedModel(ref, self.runtime, "0" * 64, 0.0)


class Gated(ModelRuntime):
    """Blocks in its second run until released: a job that is certainly mid-run."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.calls = 0
        self.second = threading.Event()
        self.release = threading.Event()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        if self.calls == 2:
            self.second.set()
            self.release.wait(10)
        return super().run(feeds)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "mlp.onnx"
    path.write_bytes(models.mlp(seed=3))
    return path


@pytest.fixture(scope="module")
def session(mlp_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])


@pytest.fixture
def store(tmp_path: Path) -> BatchJobStore:
    db = Database(f"sqlite:///{tmp_path / 'inference.db'}")
    db.migrate(MIGRATIONS)
    return BatchJobStore(db)


def make_runner(store: BatchJobStore, runtime: ModelRuntime, tmp_path: Path, worker: str = "w1") -> BatchRunner:
    return BatchRunner(store, OneModel(runtime), LocalArtifactStore(tmp_path / "artifacts"), worker,
                       scratch_dir=tmp_path / "scratch", local_paths=[str(tmp_path)])


@pytest.fixture
def runner(store: BatchJobStore, mlp_path: Path, tmp_path: Path) -> BatchRunner:
    # max_batch_size 300: chunks of 1000 rows run as 300+300+300+100
    return make_runner(store, ModelRuntime(mlp_path, max_batch_size=300), tmp_path)


def features(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 32)).astype(np.float32)


def feature_table(x: np.ndarray, **extra: pa.Array) -> pa.Table:
    return pa.table({**{f: x[:, i] for i, f in enumerate(FEATURES)}, **extra})


async def run_job(store: BatchJobStore, runner: BatchRunner, **kw: object):  # noqa: ANN201
    kw.setdefault("model", "mlp")
    job, created = store.create(principal="alice", worker_id=runner.worker_id, **kw)  # type: ignore[arg-type]
    assert created and job.state == PENDING
    await runner.submit(job.job_id)
    await runner.wait(job.job_id)
    return store.get(job.job_id)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


async def test_parquet_in_parquet_out_matches_onnxruntime(store: BatchJobStore, runner: BatchRunner,
                                                          session: ort.InferenceSession, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    x = features(10_000)
    keys = pa.array([f"row-{i}" for i in range(len(x))])
    pq.write_table(feature_table(x, key=keys), tmp_path / "in.parquet", row_group_size=3000)
    seen: list[int] = []
    progress = store.progress
    monkeypatch.setattr(store, "progress", lambda job_id, done, **kw: seen.append(done) or progress(job_id, done, **kw))

    job = await run_job(store, runner, input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "out.parquet"),
                        chunk_rows=1000)

    assert (job.state, job.error) == (SUCCEEDED, "")
    assert job.rows_total == job.rows_done == 10_000 and job.version == 3
    assert seen[:2] == [0, 0] and seen[2:12] == list(range(1000, 10_001, 1000))  # after every chunk
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == [*FEATURES, "key", "output"]  # the input's columns, then the outputs
    assert out.schema.field("output").type == pa.list_(pa.float32(), 2)
    assert out.column("key").to_pylist() == keys.to_pylist()
    got = np.stack(out.column("output").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
    assert leftovers(tmp_path) == []


async def test_csv_in(store: BatchJobStore, runner: BatchRunner, session: ort.InferenceSession, tmp_path: Path) -> None:
    x = features(2500, seed=1)
    x[:, 0] = np.arange(2500) % 7  # integer-looking: CSV inference would make it int64
    x[:, 1] = np.round(x[:, 1], 1)
    pacsv.write_csv(feature_table(x, name=pa.array(["a,b"] * 2500)), tmp_path / "in.csv")

    job = await run_job(store, runner, input_uri=str(tmp_path / "in.csv"), output_uri=str(tmp_path / "out.parquet"),
                        chunk_rows=1000)

    assert (job.state, job.error, job.rows_done, job.rows_total) == (SUCCEEDED, "", 2500, 2500)
    out = pq.read_table(tmp_path / "out.parquet")
    read_back = np.stack([out.column(f).to_numpy() for f in FEATURES], axis=1)  # as parsed, float32
    np.testing.assert_allclose(read_back, x, rtol=1e-6)
    np.testing.assert_allclose(np.stack(out.column("output").to_numpy(zero_copy_only=False)),
                               session.run(None, {"input": read_back})[0], rtol=1e-5, atol=1e-5)


async def test_explicit_input_columns(store: BatchJobStore, runner: BatchRunner, session: ort.InferenceSession,
                                      tmp_path: Path) -> None:
    x = features(500, seed=2)
    order = FEATURES[::-1]
    # Other numeric columns too: without input_columns they would count as features.
    pq.write_table(feature_table(x, user_id=pa.array(np.arange(500)), label=pa.array(np.ones(500))),
                   tmp_path / "in.parquet")

    job = await run_job(store, runner, input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "o.parquet"),
                        input_columns=order)

    assert (job.state, job.error, job.input_columns) == (SUCCEEDED, "", tuple(order))
    got = np.stack(pq.read_table(tmp_path / "o.parquet").column("output").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, session.run(None, {"input": x[:, ::-1].copy()})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("list_type", [pa.list_(pa.float64(), 32), pa.list_(pa.float32())])
async def test_column_named_like_the_input(store: BatchJobStore, runner: BatchRunner, session: ort.InferenceSession,
                                           tmp_path: Path, list_type: pa.DataType) -> None:
    x = features(300, seed=3)
    pq.write_table(pa.table({"input": pa.array(list(x.astype(np.float64)), type=list_type)}), tmp_path / "in.parquet")

    job = await run_job(store, runner, input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "o.parquet"))

    assert (job.state, job.error) == (SUCCEEDED, "")
    got = np.stack(pq.read_table(tmp_path / "o.parquet").column("output").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)


async def test_not_batchable_model_runs_row_by_row(store: BatchJobStore, tmp_path: Path) -> None:
    (tmp_path / "fixed.onnx").write_bytes(models.fixed_batch())  # x: [1, 4] -> y: [1, 2], y = x[:, :2]
    rt = ModelRuntime(tmp_path / "fixed.onnx")
    assert rt.max_batch_size == 0
    x = features(50)[:, :4]
    pq.write_table(pa.table({f"c{i}": x[:, i] for i in range(4)}), tmp_path / "in.parquet")

    job = await run_job(store, make_runner(store, rt, tmp_path), input_uri=str(tmp_path / "in.parquet"),
                        output_uri=str(tmp_path / "o.parquet"), chunk_rows=20)

    assert (job.state, job.error, job.rows_done) == (SUCCEEDED, "", 50)
    np.testing.assert_array_equal(np.stack(pq.read_table(tmp_path / "o.parquet").column("y").to_numpy(
        zero_copy_only=False)), x[:, :2])


async def test_artifact_store_in_and_out(store: BatchJobStore, runner: BatchRunner, session: ort.InferenceSession,
                                         tmp_path: Path) -> None:
    artifacts = runner.artifacts
    assert isinstance(artifacts, LocalArtifactStore)
    x = features(1200, seed=4)
    pq.write_table(feature_table(x), tmp_path / "staging-in.parquet")
    artifacts.put("data/in.parquet", (tmp_path / "staging-in.parquet").read_bytes())

    job = await run_job(store, runner, input_uri="data/in.parquet", output_uri="scores/out.parquet")

    assert (job.state, job.error) == (SUCCEEDED, "")
    assert artifacts.exists("scores/out.parquet") and artifacts.list_staged() == []
    (tmp_path / "out.parquet").write_bytes(b"".join(artifacts.open_read("scores/out.parquet")))
    got = np.stack(pq.read_table(tmp_path / "out.parquet").column("output").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
    assert list((tmp_path / "scratch").iterdir()) == []


class Remote:
    """An artifact store that is not on local disk (as S3): the runner must copy the input."""

    def __init__(self, inner: LocalArtifactStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_remote_artifact_store_input_is_copied_then_removed(store: BatchJobStore, mlp_path: Path,
                                                                   session: ort.InferenceSession,
                                                                   tmp_path: Path) -> None:
    artifacts = LocalArtifactStore(tmp_path / "bucket")
    runner = BatchRunner(store, OneModel(ModelRuntime(mlp_path)), Remote(artifacts), "w1",  # type: ignore[arg-type]
                         scratch_dir=tmp_path / "scratch")
    x = features(700, seed=5)
    pq.write_table(feature_table(x), tmp_path / "in.parquet")
    artifacts.put("in.parquet", (tmp_path / "in.parquet").read_bytes())
    assert runner.input_exists("in.parquet") and not runner.input_exists("nope.parquet")

    job = await run_job(store, runner, input_uri="in.parquet", output_uri="out/scores.parquet", chunk_rows=256)

    assert (job.state, job.error) == (SUCCEEDED, "")
    (tmp_path / "out.parquet").write_bytes(b"".join(artifacts.open_read("out/scores.parquet")))
    got = np.stack(pq.read_table(tmp_path / "out.parquet").column("output").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-5)
    assert list((tmp_path / "scratch").iterdir()) == [] and artifacts.list_staged() == []


async def test_empty_input_gives_an_empty_output(store: BatchJobStore, runner: BatchRunner, tmp_path: Path) -> None:
    pq.write_table(feature_table(features(0)), tmp_path / "in.parquet")
    job = await run_job(store, runner, input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "o.parquet"))
    assert (job.state, job.error, job.rows_total, job.rows_done) == (SUCCEEDED, "", 0, 0)
    out = pq.read_table(tmp_path / "o.parquet")
    assert out.num_rows == 0 and out.schema.field("output").type == pa.list_(pa.float32(), 2)


@pytest.mark.parametrize(("table", "kw", "problem"), [
    (lambda: feature_table(features(10)).drop_columns(["f7", "f9"]), {},
     "the model's input 'input' takes 32 features per row; 30 columns were given"),
    (lambda: feature_table(features(10)), {"input_columns": [*FEATURES[:31], "nope"]},
     "the input file has no column 'nope'"),
    (lambda: pa.table({"input": pa.array(["1.0"] * 10)}), {}, "column 'input' is string; the model's input 'input' takes FP32"),
    (lambda: feature_table(features(10)).set_column(3, "f3", pa.array(["x"] * 10)), {"input_columns": FEATURES},
     "column 'f3' is string; the model's input 'input' takes FP32"),
    (lambda: feature_table(features(10)).set_column(5, "f5", pa.array([1.0] * 8 + [None, None], pa.float32())), {},
     "rows 0..9: column 'f5' has 2 empty value(s)"),
    (lambda: feature_table(features(10), output=pa.array(np.zeros(10))), {"input_columns": FEATURES},
     "named like the model's outputs ['output']"),
])
async def test_bad_input_fails_the_job_and_writes_nothing(store: BatchJobStore, runner: BatchRunner, tmp_path: Path,
                                                          table, kw: dict, problem: str) -> None:  # noqa: ANN001
    pq.write_table(table(), tmp_path / "in.parquet")
    job = await run_job(store, runner, input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "o.parquet"),
                        **kw)
    assert job.state == FAILED
    assert problem in job.error
    assert not (tmp_path / "o.parquet").exists() and leftovers(tmp_path) == []


async def test_csv_value_that_does_not_parse_fails_the_job(store: BatchJobStore, runner: BatchRunner,
                                                          tmp_path: Path) -> None:
    lines = [",".join(FEATURES)] + [",".join(["0.5"] * 32)] * 20 + [",".join(["0.5"] * 31 + ["n/a?"])]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    job = await run_job(store, runner, input_uri=str(tmp_path / "in.csv"), output_uri=str(tmp_path / "o.parquet"),
                        chunk_rows=8, input_columns=FEATURES)
    assert job.state == FAILED
    assert job.error == "In CSV column 'f31': CSV conversion error to float: invalid value 'n/a?'"
    assert not (tmp_path / "o.parquet").exists() and leftovers(tmp_path) == []


async def test_missing_input_file_and_unknown_model_fail_the_job(store: BatchJobStore, runner: BatchRunner,
                                                                 tmp_path: Path) -> None:
    job = await run_job(store, runner, input_uri=str(tmp_path / "nope.parquet"), output_uri=str(tmp_path / "o.parquet"))
    assert job.state == FAILED and job.error == f"input_uri: no file at {tmp_path / 'nope.parquet'}"
    pq.write_table(feature_table(features(5)), tmp_path / "in.parquet")
    job = await run_job(store, runner, model="other", input_uri=str(tmp_path / "in.parquet"),
                        output_uri=str(tmp_path / "o.parquet"))
    assert job.state == FAILED and job.error == "models/other not found in the registry"


async def test_cancel_mid_run_writes_nothing(store: BatchJobStore, mlp_path: Path, tmp_path: Path) -> None:
    gated = Gated(mlp_path)
    runner = make_runner(store, gated, tmp_path)
    pq.write_table(feature_table(features(5000)), tmp_path / "in.parquet")
    job, _ = store.create(model="mlp", input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "o.parquet"),
                          chunk_rows=1000, principal="alice", worker_id="w1")
    await runner.submit(job.job_id)
    assert await asyncio.to_thread(gated.second.wait, 10)  # chunk 2 is being scored
    assert store.get(job.job_id).state == RUNNING and store.get(job.job_id).rows_done == 1000
    assert (tmp_path / f"o.parquet.tmp-{job.job_id}").exists()

    cancelled = store.cancel(job.job_id)  # as any serving process would: a database change
    gated.release.set()
    await runner.wait(job.job_id)

    assert cancelled.state == CANCELLED
    final = store.get(job.job_id)
    assert (final.state, final.rows_done, final.error) == (CANCELLED, 1000, "")
    assert gated.calls == 2  # stopped after the chunk in flight
    assert not (tmp_path / "o.parquet").exists() and leftovers(tmp_path) == []
    assert store.cancel(job.job_id).state == CANCELLED  # a retried cancel is fine


async def test_jobs_beyond_max_running_wait_pending(store: BatchJobStore, mlp_path: Path, tmp_path: Path) -> None:
    gated = Gated(mlp_path)
    runner = BatchRunner(store, OneModel(gated), None, "w1", scratch_dir=tmp_path / "scratch", max_running=1,
                         local_paths=[str(tmp_path)])
    pq.write_table(feature_table(features(3000)), tmp_path / "in.parquet")
    first, second = (store.create(model="mlp", input_uri=str(tmp_path / "in.parquet"),
                                  output_uri=str(tmp_path / f"o{i}.parquet"), chunk_rows=1000, principal="alice",
                                  worker_id="w1")[0] for i in range(2))
    await runner.submit(first.job_id)
    await runner.submit(second.job_id)
    assert await asyncio.to_thread(gated.second.wait, 10)
    assert store.get(second.job_id).state == PENDING  # queued behind the first
    store.cancel(second.job_id)
    gated.release.set()
    await runner.wait(first.job_id)
    await runner.wait(second.job_id)
    assert store.get(first.job_id).state == SUCCEEDED and store.get(second.job_id).state == CANCELLED
    assert (tmp_path / "o0.parquet").exists() and not (tmp_path / "o1.parquet").exists()


async def test_runner_close_interrupts_running_jobs(store: BatchJobStore, mlp_path: Path, tmp_path: Path) -> None:
    gated = Gated(mlp_path)
    runner = make_runner(store, gated, tmp_path)
    pq.write_table(feature_table(features(3000)), tmp_path / "in.parquet")
    job, _ = store.create(model="mlp", input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "o.parquet"),
                          chunk_rows=1000, principal="alice", worker_id="w1")
    await runner.submit(job.job_id)
    assert await asyncio.to_thread(gated.second.wait, 10)
    closing = asyncio.ensure_future(runner.close())
    gated.release.set()
    await closing
    final = store.get(job.job_id)
    assert (final.state, final.error) == (FAILED, INTERRUPTED)
    assert not (tmp_path / "o.parquet").exists() and leftovers(tmp_path) == []


async def test_cancel_rules(store: BatchJobStore, runner: BatchRunner, tmp_path: Path) -> None:
    pq.write_table(feature_table(features(10)), tmp_path / "in.parquet")
    spec = {"model": "mlp", "input_uri": str(tmp_path / "in.parquet"), "output_uri": str(tmp_path / "o.parquet"),
            "principal": "alice", "worker_id": "w1"}
    pending, _ = store.create(**spec)
    assert store.cancel(pending.job_id).state == CANCELLED
    await runner.submit(pending.job_id)  # a cancelled job does not start
    await runner.wait(pending.job_id)
    assert store.get(pending.job_id).state == CANCELLED and not (tmp_path / "o.parquet").exists()

    done = await run_job(store, runner, input_uri=spec["input_uri"], output_uri=spec["output_uri"])
    with pytest.raises(FailedPrecondition, match="has already succeeded"):
        store.cancel(done.job_id)

    finishing, _ = store.create(**spec)
    assert store.start(finishing.job_id, "w1") and store.progress(finishing.job_id, 10, rows_total=10)
    with pytest.raises(FailedPrecondition, match="can no longer be cancelled"):
        store.cancel(finishing.job_id)
    with pytest.raises(NotFound, match="batchJobs/0123 not found"):
        store.cancel("0123")


def test_create_is_idempotent(store: BatchJobStore) -> None:
    spec = {"model": "mlp", "input_uri": "/d/in.parquet", "output_uri": "/d/out.parquet", "principal": "alice",
            "worker_id": "w1"}
    first, created = store.create(**spec, request_id="req-1")
    again, created_again = store.create(**spec, request_id="req-1")
    other, _ = store.create(**spec, request_id="req-2")
    assert created and not created_again and again.job_id == first.job_id and other.job_id != first.job_id
    assert first.chunk_rows == 4096 and first.created_by == "alice"


@pytest.mark.parametrize(("change", "field"), [
    ({"model": ""}, "job.model"),
    ({"version": -1}, "job.version"),
    ({"version": 2, "alias": "prod"}, "job.alias"),
    ({"input_uri": ""}, "job.input_uri"),
    ({"input_uri": "/d/in.json"}, "job.input_uri"),
    ({"input_uri": "s3://bucket/in.parquet"}, "job.input_uri"),
    ({"input_uri": "data/../secret.csv"}, "job.input_uri"),
    ({"output_uri": ""}, "job.output_uri"),
    ({"output_uri": "/d/out.csv"}, "job.output_uri"),
    ({"output_uri": "/d/in.parquet"}, "job.output_uri"),
    ({"chunk_rows": -1}, "job.chunk_rows"),
    ({"chunk_rows": 1_000_001}, "job.chunk_rows"),
    ({"input_columns": ["a", ""]}, "job.input_columns[1]"),
    ({"input_columns": ["a", "b", "a"]}, "job.input_columns[2]"),
])
def test_invalid_requests_name_the_field(store: BatchJobStore, change: dict, field: str) -> None:
    spec = {"model": "mlp", "input_uri": "/d/in.parquet", "output_uri": "/d/out.parquet", **change}
    with pytest.raises(InvalidArgument) as e:
        store.create(**spec, principal="alice", worker_id="w1")
    assert e.value.field == field


def test_list_newest_first_in_pages(store: BatchJobStore) -> None:
    ids = [store.create(model="mlp", input_uri="/d/in.parquet", output_uri=f"/d/out{i}.parquet", principal="a",
                        worker_id="w1")[0].job_id for i in range(5)]
    page1, token = store.list(page_size=3)
    page2, last = store.list(page_size=3, page_token=token)
    assert [j.job_id for j in page1 + page2] == ids[::-1] and last == ""
    with pytest.raises(InvalidArgument) as e:
        store.list(page_token="not-a-token")
    assert e.value.field == "page_token"


async def test_recover_fails_the_jobs_of_processes_that_are_gone(store: BatchJobStore, runner: BatchRunner,
                                                                 tmp_path: Path) -> None:
    spec = {"model": "mlp", "input_uri": "/d/in.parquet", "principal": "alice"}
    pending, _ = store.create(**spec, output_uri=str(tmp_path / "a.parquet"), worker_id="dead")
    running, _ = store.create(**spec, output_uri=str(tmp_path / "b.parquet"), worker_id="dead")
    assert store.start(running.job_id, "dead") and store.progress(running.job_id, 500)
    (tmp_path / f"b.parquet.tmp-{running.job_id}").write_bytes(b"half a file")
    alive, _ = store.create(**spec, output_uri=str(tmp_path / "c.parquet"), worker_id="live")

    recovered = await runner.recover(lambda worker: worker == "live")

    assert sorted(j.job_id for j in recovered) == sorted([pending.job_id, running.job_id])
    for j in (pending, running):
        assert (store.get(j.job_id).state, store.get(j.job_id).error) == (FAILED, INTERRUPTED)
    assert store.get(alive.job_id).state == PENDING
    assert leftovers(tmp_path) == []
    assert await runner.recover(lambda worker: worker == "live") == []


async def test_servicer(store: BatchJobStore, runner: BatchRunner, tmp_path: Path) -> None:
    svc = BatchJobsServicer(store, runner)
    pq.write_table(feature_table(features(100)), tmp_path / "in.parquet")
    req = pb.CreateBatchJobRequest(job=pb.BatchJob(model="mlp", input_uri=str(tmp_path / "in.parquet"),
                                                   output_uri=str(tmp_path / "o.parquet")), request_id="r1")
    created = (await svc.CreateBatchJob(req, None)).job
    assert created.version == 3 and created.created_by == "anonymous" and created.chunk_rows == 4096
    await runner.wait(created.job_id)
    got = (await svc.GetBatchJob(pb.GetBatchJobRequest(job_id=created.job_id), None)).job
    assert got.state == pb.BATCH_JOB_STATE_SUCCEEDED and got.rows_done == got.rows_total == 100
    assert got.create_time.ToDatetime() <= got.update_time.ToDatetime()
    assert (await svc.CreateBatchJob(req, None)).job.job_id == created.job_id  # a retry
    listed = await svc.ListBatchJobs(pb.ListBatchJobsRequest(), None)
    assert [j.job_id for j in listed.jobs] == [created.job_id] and listed.next_page_token == ""
    with pytest.raises(FailedPrecondition):
        await svc.CancelBatchJob(pb.CancelBatchJobRequest(job_id=created.job_id), None)
    with pytest.raises(NotFound):
        await svc.CreateBatchJob(pb.CreateBatchJobRequest(job=pb.BatchJob(
            model="other", input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / "x.parquet"))), None)
    with pytest.raises(InvalidArgument) as e:
        await svc.CreateBatchJob(pb.CreateBatchJobRequest(job=pb.BatchJob(
            model="mlp", input_uri=str(tmp_path / "missing.parquet"), output_uri=str(tmp_path / "x.parquet"))), None)
    assert e.value.field == "job.input_uri"


def test_job_states_keep_the_numbers_the_table_stores(store: BatchJobStore) -> None:
    """The batch_jobs.state column holds the proto's numbers (no migration when the domain got
    its own enum); the servicer's converter maps every state to the proto enum of that name."""
    for state in BatchJobState:
        assert int(state) == pb.BatchJobState.Value(f"BATCH_JOB_STATE_{state.name}")
    job, _ = store.create(model="mlp", input_uri="in.parquet", output_uri="out.parquet", principal="p",
                          worker_id="w")
    assert job.state is BatchJobState.PENDING
    for state in BatchJobState:
        assert job_pb(dataclasses.replace(job, state=state)).state == int(state)


def test_batch_job_modules_import_no_protobuf() -> None:
    """The domain of batch jobs (services/inference/batch_jobs/) knows nothing of protobuf: the
    RPCs and their converters are in batch_servicer.py."""
    code = ("import sys, services.inference.batch_jobs.store, services.inference.batch_jobs.feeds, "
            "services.inference.batch_jobs.output, services.inference.batch_jobs.runner\n"
            "print(sorted(m for m in sys.modules if m.endswith(('_pb2', '_pb2_grpc'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
