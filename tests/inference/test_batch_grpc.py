"""A batch job through the running service: Parquet in, predictions out, progress to the end."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
from strata.inference.v1 import inference_pb2 as pb

from tests.inference.conftest import Inference, Registry


def test_batch_job_scores_a_parquet_file(inference: Inference, registry: Registry, tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((5000, 32)).astype(np.float32)
    src, out = tmp_path / "rows.parquet", tmp_path / "scored.parquet"
    pq.write_table(pa.table({f"f{i}": x[:, i] for i in range(32)} | {"id": np.arange(5000)}), src)
    stub = inference.stub()
    job = stub.CreateBatchJob(pb.CreateBatchJobRequest(job=pb.BatchJob(
        model="mlp", version=2, input_uri=str(src), output_uri=str(out), chunk_rows=1000,
        input_columns=[f"f{i}" for i in range(32)]))).job
    deadline = time.time() + 60
    while time.time() < deadline:
        job = stub.GetBatchJob(pb.GetBatchJobRequest(job_id=job.job_id)).job
        if job.state not in (pb.BATCH_JOB_STATE_PENDING, pb.BATCH_JOB_STATE_RUNNING):
            break
        time.sleep(0.1)
    assert job.state == pb.BATCH_JOB_STATE_SUCCEEDED, job.error
    assert (job.rows_done, job.rows_total) == (5000, 5000)
    scored = pq.read_table(out)
    want = ort.InferenceSession(registry.artifacts[("mlp", 2)]).run(None, {"input": x})[0]
    got = np.array(scored.column("output").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert scored.column("id").to_pylist() == list(range(5000))
    assert job.job_id in [j.job_id for j in stub.ListBatchJobs(pb.ListBatchJobsRequest()).jobs]


@pytest.mark.parametrize("field, path", [
    ("input_uri", "/etc/passwd.parquet"), ("input_uri", "/etc/missing.parquet"), ("input_uri", "{out}/x.parquet"),
    ("input_uri", "{tmp}/link/x.parquet"), ("input_uri", "{tmp}/*/../../x.parquet"), ("input_uri", "../x.parquet"),
    ("output_uri", "/tmp/strata-escape.parquet"), ("output_uri", "{out}/x.parquet"),
    ("output_uri", "{tmp}/link/escape.parquet"), ("output_uri", "{tmp}/*.parquet"), ("output_uri", "a/../../x.parquet"),
])
def test_batch_jobs_touch_only_the_allowed_places(inference: Inference, tmp_path: Path, field: str, path: str) -> None:
    """Input and output are confined to the artifact store and STRATA_INFERENCE_BATCH_PATHS; the
    answer is the same whether or not a file is there, and nothing is written outside."""
    outside = Path(f"/tmp/strata-outside-{os.getpid()}")
    outside.mkdir(exist_ok=True)
    (outside / "x.parquet").write_bytes(b"PAR1")
    (tmp_path / "link").symlink_to(outside)
    pq.write_table(pa.table({"f0": [1.0]}), tmp_path / "in.parquet")
    uris = {"input_uri": str(tmp_path / "in.parquet"), "output_uri": str(tmp_path / "out.parquet")}
    uris[field] = path.format(tmp=tmp_path, out=outside)
    with pytest.raises(grpc.RpcError) as err:
        inference.stub().CreateBatchJob(pb.CreateBatchJobRequest(job=pb.BatchJob(model="mlp", version=2, **uris)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"job.{field}: "), err.value.details()
    assert "no file" not in err.value.details()  # nothing said about what lies on the host
    assert sorted(p.name for p in outside.iterdir()) == ["x.parquet"]
    assert not Path("/tmp/strata-escape.parquet").exists()
