"""The monitoring service through gRPC, as real processes (a registry and the monitoring service,
one artifact store), on SQLite and on PostgreSQL: ingestion that stores a re-sent batch once and
survives kill -9, late labels giving scikit-learn's metrics, drift flagging the shifted features,
references from a Parquet table and from the registry lineage, and bad input refused with the
field named and nothing stored."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sklearn import metrics as skm
from strata.monitoring.v1 import monitoring_pb2 as pb
from strata.registry.v1 import registry_pb2 as rpb

from tests.monitoring.conftest import FEATURES, Platform, arrow_ipc, classifier_onnx, records


def refused(call: Callable[[], Any], code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    """Run `call`, which must fail with `code`; the field its BadRequest detail names ("" if none)."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    status = rpc_status.from_call(e.value)
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    return ""


def ingest(stub, *batches: pb.IngestPredictionsRequest) -> pb.IngestPredictionsResponse:  # noqa: ANN001
    return stub.IngestPredictions(iter(batches), timeout=60)


def register(platform: Platform, name: str, onnx: bytes, lineage: rpb.Lineage | None = None) -> int:
    path = platform.home / f"{name}.onnx"
    path.write_bytes(onnx)
    with platform.registry() as client:
        return client.register_onnx(name, path, create_model=True, lineage=lineage).version


def features(rng: np.random.Generator, n: int, shift: dict[int, tuple[float, float]] | None = None) -> dict:
    """n rows of the four features, normal(0, 1); `shift`: feature index -> (added, scale)."""
    out = {}
    for i, name in enumerate(FEATURES):
        add, scale = (shift or {}).get(i, (0.0, 1.0))
        out[name] = (rng.normal(size=n) * scale + add).astype(np.float32)
    return out


def rows_of(stub, **target: Any) -> dict[tuple[str, int, bool], int]:  # noqa: ANN001
    """{(model, version, shadow): rows} of the target's predictions in the last day."""
    got = stub.GetPerformance(pb.GetPerformanceRequest(**target))
    return {(v.model, v.version, v.shadow): v.rows for v in got.versions}


def classified(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    p1 = (rng.integers(0, 1025, n) / 1024).astype(np.float32)  # (exact in float32: rows sum to 1)
    return {"label": (p1 > 0.5).astype(np.int64), "probabilities": np.column_stack((1 - p1, p1))}


# -- ingestion -----------------------------------------------------------------------------------

def test_a_batch_sent_twice_and_a_retried_stream_are_stored_once(platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(1)
    ids = [f"dup-{i}" for i in range(60)]
    recs = records(ids, features(rng, 60), classified(rng, 60), endpoint="dup")
    first = ingest(stub, pb.IngestPredictionsRequest(records=recs[:40]), pb.IngestPredictionsRequest(records=recs[30:]))
    assert (first.received, first.stored, first.duplicates) == (70, 60, 10)
    again = ingest(stub, pb.IngestPredictionsRequest(records=recs))  # a retried stream
    assert (again.received, again.stored, again.duplicates) == (60, 0, 60)
    # A batch record of 8 rows is 8 predictions "{request_id}:{row}"; an Arrow batch stores by its ids.
    batch = records(["dup-batch"], features(rng, 8), classified(rng, 8), endpoint="dup")
    assert ingest(stub, pb.IngestPredictionsRequest(records=batch)).stored == 8
    table = pa.table({"prediction_id": [f"dup-arrow-{i}" for i in range(5)], "endpoint": ["dup"] * 5,
                      "model": ["fraud-model"] * 5, "version": [1] * 5,
                      "time": pa.array([datetime.now(UTC)] * 5, pa.timestamp("us", tz="UTC")),
                      **{f: rng.normal(size=5).astype(np.float32) for f in FEATURES},
                      "label": np.ones(5, np.int64)})
    arrow = pb.IngestPredictionsRequest(arrow_ipc=arrow_ipc(table), output_columns=["label"])
    assert (ingest(stub, arrow, arrow).stored, ingest(stub, arrow).duplicates) == (5, 5)
    assert rows_of(stub, endpoint="dup") == {("fraud-model", 1, False): 73}
    # After compaction into Parquet and a restart the ids are still known (the index is loaded again).
    _wait_for_files(platform, "dup")
    platform.restart_monitoring()
    stub = platform.monitoring()
    assert ingest(stub, pb.IngestPredictionsRequest(records=recs[:10] + batch)).duplicates == 18
    assert rows_of(stub, endpoint="dup") == {("fraud-model", 1, False): 73}


def _wait_for_files(platform: Platform, endpoint: str, timeout: float = 20) -> list[Path]:
    deadline = time.monotonic() + timeout
    root = platform.store / "monitoring" / "predictions" / f"endpoint={endpoint}"
    while time.monotonic() < deadline:
        files = sorted(root.rglob("*.parquet")) if root.exists() else []
        if files:
            return files
        time.sleep(0.1)
    raise AssertionError(f"no Parquet file under {root} after {timeout} s")


def test_acknowledged_rows_survive_kill_9_and_an_unacknowledged_batch_is_whole_or_absent(platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(2)
    acked = records([f"k9-{i}" for i in range(200)], features(rng, 200), classified(rng, 200), endpoint="k9")
    assert ingest(stub, pb.IngestPredictionsRequest(records=acked)).stored == 200
    # Batches of a stream that is never closed (never acknowledged), then kill -9 mid-stream.
    size, sent = 50, threading.Event()

    def open_stream() -> Iterator[pb.IngestPredictionsRequest]:
        for b in range(4):
            yield pb.IngestPredictionsRequest(records=records(
                [f"k9-open-{b}-{i}" for i in range(size)], features(rng, size), classified(rng, size), endpoint="k9"))
        sent.set()
        time.sleep(60)  # the stream stays open until the server dies

    call = stub.IngestPredictions.future(open_stream(), timeout=90)
    assert sent.wait(30)
    time.sleep(0.2)
    platform.restart_monitoring(kill=True)
    with pytest.raises(grpc.RpcError):
        call.result()
    rows = rows_of(platform.monitoring(), endpoint="k9")[("fraud-model", 1, False)]
    assert rows >= 200 and (rows - 200) % size == 0, rows
    # The replayed log went to Parquet, and a re-sent batch is still a duplicate.
    assert _wait_for_files(platform, "k9")
    assert ingest(platform.monitoring(), pb.IngestPredictionsRequest(records=acked[:20])).duplicates == 20


# -- ground truth and performance ----------------------------------------------------------------

def test_late_labels_give_scikit_learns_metrics_per_version_with_shadows_apart(platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(3)
    n = 400
    ids = [f"perf-{i}" for i in range(n)]
    x = features(rng, n)
    served, shadowed = classified(rng, n), classified(rng, n)
    ingest(stub, pb.IngestPredictionsRequest(records=records(ids, x, served, endpoint="perf", model="perf-model")),
           pb.IngestPredictionsRequest(records=records(ids, x, shadowed, endpoint="perf", model="perf-model",
                                                       version=2, shadow=True)))
    before = stub.GetPerformance(pb.GetPerformanceRequest(endpoint="perf"))
    assert [(v.version, v.shadow, v.labeled_rows, v.WhichOneof("metrics")) for v in before.versions] == \
        [(1, False, 0, None), (2, True, 0, None)]
    labelled = rng.permutation(n)[:300]
    truth = rng.integers(0, 2, n)
    stored = stub.ReportGroundTruth(pb.ReportGroundTruthRequest(labels=[
        pb.GroundTruth(prediction_id=f"perf-{i}:0", number=float(truth[i])) for i in labelled]))
    assert stored.stored == 300
    got = stub.GetPerformance(pb.GetPerformanceRequest(endpoint="perf"))
    assert [(v.version, v.shadow, v.rows, v.labeled_rows) for v in got.versions] == [(1, False, n, 300),
                                                                                     (2, True, n, 300)]
    for v, outputs in zip(got.versions, (served, shadowed), strict=True):
        y, p, proba = truth[labelled], outputs["label"][labelled], outputs["probabilities"][labelled].astype(np.float64)
        m = v.classification
        assert v.label_coverage == 0.75 and v.task == pb.TASK_CLASSIFICATION
        assert m.accuracy == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
        assert m.precision == pytest.approx(skm.precision_score(y, p), abs=1e-12)
        assert m.recall == pytest.approx(skm.recall_score(y, p), abs=1e-12)
        assert m.f1 == pytest.approx(skm.f1_score(y, p), abs=1e-12)
        assert m.roc_auc == pytest.approx(skm.roc_auc_score(y, proba[:, 1]), abs=1e-12)
        assert m.log_loss == pytest.approx(skm.log_loss(y, proba), abs=1e-12)
        assert (list(m.classes), m.average, m.positive_class) == (["0", "1"], "binary", "1")


def test_regression_metrics_from_late_labels_equal_scikit_learns(platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(4)
    n = 250
    x = features(rng, n)
    predicted = rng.normal(10, 3, n).astype(np.float32)
    ingest(stub, pb.IngestPredictionsRequest(records=records(
        [f"reg-{i}" for i in range(n)], x, {"variable": predicted.reshape(n, 1)}, endpoint="", model="reg-model")))
    truth = predicted.astype(np.float64) + rng.normal(0, 1, n)
    stub.ReportGroundTruth(pb.ReportGroundTruthRequest(labels=[
        pb.GroundTruth(prediction_id=f"reg-{i}:0", number=truth[i]) for i in range(n)]))
    (v,) = stub.GetPerformance(pb.GetPerformanceRequest(model="reg-model", version=1)).versions
    y, p = truth, predicted.astype(np.float64)
    assert v.task == pb.TASK_REGRESSION and v.label_coverage == 1.0
    assert v.regression.mae == pytest.approx(skm.mean_absolute_error(y, p), abs=1e-12)
    assert v.regression.rmse == pytest.approx(skm.root_mean_squared_error(y, p), abs=1e-12)
    assert v.regression.mape == pytest.approx(skm.mean_absolute_percentage_error(y, p), abs=1e-12)
    assert v.regression.r2 == pytest.approx(skm.r2_score(y, p), abs=1e-12)


# -- references and drift ------------------------------------------------------------------------

def test_drift_over_an_injected_shift_flags_the_shifted_features_against_a_parquet_reference(
        platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(5)
    version = register(platform, "drift-model", classifier_onnx())
    ref = features(rng, 3000)
    (platform.store / "refs").mkdir(exist_ok=True)
    pq.write_table(pa.table({**ref, "label": (ref[FEATURES[0]] > 0).astype(np.int64)}),
                   platform.store / "refs" / "drift.parquet")
    got = stub.SetReference(pb.SetReferenceRequest(model="drift-model", version=version,
                                                   table_uri="refs/drift.parquet")).reference
    assert [(c.name, c.role, c.kind, c.rows) for c in got.columns] == [
        *((f, pb.COLUMN_ROLE_FEATURE, pb.COLUMN_KIND_NUMERIC, 3000) for f in FEATURES),
        ("label", pb.COLUMN_ROLE_PREDICTION, pb.COLUMN_KIND_NUMERIC, 3000)]
    assert not got.from_lineage and len(got.table_sha256) == 64
    n = 2000
    current = features(rng, n, shift={1: (0.8, 1.0), 3: (0.0, 3.0)})
    outputs = {"label": (current[FEATURES[0]] > 0.7).astype(np.int64),
               "probabilities": np.full((n, 2), 0.5, np.float32)}
    ingest(stub, pb.IngestPredictionsRequest(records=records([f"drift-{i}" for i in range(n)], current, outputs,
                                                             endpoint="drift", model="drift-model",
                                                             version=version)))
    (report,) = stub.GetDriftReport(pb.GetDriftReportRequest(endpoint="drift")).versions
    assert {f.column for f in report.features if f.drifted} == {FEATURES[1], FEATURES[3]}
    assert all(f.method == pb.DRIFT_METHOD_WASSERSTEIN and f.reference_rows == 3000 and f.current_rows == n
               for f in report.features)
    assert (report.drifted_features, report.share_drifted, report.dataset_drifted) == (2, 0.5, True)
    (label,) = report.predictions
    assert label.column == "label" and label.method == pb.DRIFT_METHOD_JENSENSHANNON and label.drifted
    assert list(report.missing_columns) == []
    # An override is applied, and one for a column nobody profiled is refused by name.
    strict = stub.GetDriftReport(pb.GetDriftReportRequest(
        model="drift-model", version=version, drift_share=0.75,
        overrides={FEATURES[0]: pb.DriftOverride(method=pb.DRIFT_METHOD_PSI, threshold=0.0)})).versions[0]
    assert strict.features[0].method == pb.DRIFT_METHOD_PSI and strict.features[0].drifted
    assert (strict.drifted_features, strict.dataset_drifted) == (3, True)
    assert refused(lambda: stub.GetDriftReport(pb.GetDriftReportRequest(
        endpoint="drift", overrides={"nope": pb.DriftOverride(threshold=0.2)}))) == "overrides['nope']"


def test_a_reference_from_the_registry_lineage_is_kept_across_a_restart(platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(6)
    training = features(rng, 1500)
    (platform.store / "training-sets").mkdir(exist_ok=True)
    path = platform.store / "training-sets" / "lineage.parquet"
    pq.write_table(pa.table({"entity_id": np.arange(1500), **training, "target": rng.integers(0, 2, 1500)}), path)
    version = register(platform, "lineage-model", classifier_onnx(),
                       rpb.Lineage(dataset_uri="training-sets/lineage.parquet", training_job_id="job-1"))
    ref = stub.SetReference(pb.SetReferenceRequest(model="lineage-model", version=version,
                                                   prediction_columns={"label": "target"})).reference
    assert ref.from_lineage and ref.table_uri == "training-sets/lineage.parquet" and ref.rows == 1500
    assert [(c.name, c.source_column, c.role) for c in ref.columns] == [
        *((f, f, pb.COLUMN_ROLE_FEATURE) for f in FEATURES), ("label", "target", pb.COLUMN_ROLE_PREDICTION)]
    n = 800
    ingest(stub, pb.IngestPredictionsRequest(records=records(
        [f"lin-{i}" for i in range(n)], features(rng, n, shift={0: (2.0, 1.0)}), classified(rng, n),
        endpoint="lin", model="lineage-model", version=version)))
    before = stub.GetDriftReport(pb.GetDriftReportRequest(endpoint="lin")).versions[0]
    assert [f.column for f in before.features if f.drifted] == [FEATURES[0]]
    # The profile is stored: a restart reads it back, even with the training set gone.
    path.unlink()
    platform.restart_monitoring()
    stub = platform.monitoring()
    assert stub.GetReference(pb.GetReferenceRequest(model="lineage-model", version=version)).reference == ref
    after = stub.GetDriftReport(pb.GetDriftReportRequest(endpoint="lin")).versions[0]
    assert [(f.column, f.score, f.drifted) for f in after.features] == \
        [(f.column, f.score, f.drifted) for f in before.features]


# -- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_refused_with_the_field_named_and_nothing_stored(platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(7)
    NOT_FOUND, FAILED = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION
    version = register(platform, "bad-model", classifier_onnx())
    good = records([f"bad-{i}" for i in range(10)], features(rng, 10), classified(rng, 10), endpoint="bad",
                   model="bad-model", version=version)
    ingest(stub, pb.IngestPredictionsRequest(records=good))
    # Unknown endpoint or version; an empty window; a window that ends before it starts.
    refused(lambda: stub.GetDriftReport(pb.GetDriftReportRequest(endpoint="never")), NOT_FOUND)
    refused(lambda: stub.GetPerformance(pb.GetPerformanceRequest(model="bad-model", version=99)), NOT_FOUND)
    past = pb.TimeWindow(start_time={"seconds": 10**9}, end_time={"seconds": 10**9 + 3600})
    assert refused(lambda: stub.GetPerformance(pb.GetPerformanceRequest(endpoint="bad", window=past)), FAILED) \
        == "window"
    backwards = pb.TimeWindow(start_time={"seconds": 10**9 + 3600}, end_time={"seconds": 10**9})
    assert refused(lambda: stub.GetDriftReport(pb.GetDriftReportRequest(endpoint="bad", window=backwards))) \
        == "window"
    assert refused(lambda: stub.GetDriftReport(pb.GetDriftReportRequest())) == "endpoint"
    # Drift without a reference.
    refused(lambda: stub.GetDriftReport(pb.GetDriftReportRequest(endpoint="bad")), FAILED)
    # Ground truth for an unknown prediction id: nothing stored, the known id's label included.
    assert refused(lambda: stub.ReportGroundTruth(pb.ReportGroundTruthRequest(labels=[
        pb.GroundTruth(prediction_id="bad-0:0", number=1), pb.GroundTruth(prediction_id="bad-x:0", number=0)]))) \
        == "labels[1].prediction_id"
    assert stub.GetPerformance(pb.GetPerformanceRequest(endpoint="bad")).versions[0].labeled_rows == 0
    assert refused(lambda: stub.ReportGroundTruth(pb.ReportGroundTruthRequest(labels=[
        pb.GroundTruth(prediction_id="bad-0:0")]))) == "labels[0].value"
    # A reference with a column the model lacks, a path out of the store, an unknown version.
    (platform.store / "refs").mkdir(exist_ok=True)
    pq.write_table(pa.table({**features(rng, 50), "customer_age": rng.normal(size=50)}),
                   platform.store / "refs" / "extra.parquet")
    assert refused(lambda: stub.SetReference(pb.SetReferenceRequest(
        model="bad-model", version=version, table_uri="refs/extra.parquet"))) == "table_uri"
    assert refused(lambda: stub.SetReference(pb.SetReferenceRequest(
        model="bad-model", version=version, table_uri="refs/extra.parquet", columns=[*FEATURES, "customer_age"]))) \
        == "columns[4]"
    assert refused(lambda: stub.SetReference(pb.SetReferenceRequest(
        model="bad-model", version=version, table_uri="refs/extra.parquet", columns=FEATURES,
        prediction_columns={"score": "customer_age"}))) == "prediction_columns['score']"
    for bad_path in ("../../etc/passwd", "/etc/passwd", "refs/%2e%2e/x.parquet", "file:///etc/passwd"):
        assert refused(lambda p=bad_path: stub.SetReference(pb.SetReferenceRequest(
            model="bad-model", version=version, table_uri=p))) == "table_uri"
    refused(lambda: stub.SetReference(pb.SetReferenceRequest(model="bad-model", version=7,
                                                             table_uri="refs/extra.parquet")), NOT_FOUND)
    assert refused(lambda: stub.SetReference(pb.SetReferenceRequest(model="bad-model", version=version)),
                   FAILED) == "table_uri"  # no lineage in the registry
    refused(lambda: stub.GetReference(pb.GetReferenceRequest(model="bad-model", version=version)), NOT_FOUND)
    # Malformed batches: nothing of the batch is stored.
    wrong = records(["bad-w"], features(rng, 1), classified(rng, 1), endpoint="bad", model="Bad/Model")
    assert refused(lambda: ingest(stub, pb.IngestPredictionsRequest(records=wrong))) == "records[0].model"
    no_time = pa.table({"prediction_id": ["bad-a"], "model": ["bad-model"], "version": [version], "f": [1.0]})
    assert refused(lambda: ingest(stub, pb.IngestPredictionsRequest(arrow_ipc=arrow_ipc(no_time)))) \
        == "arrow_ipc['time']"
    assert refused(lambda: ingest(stub, pb.IngestPredictionsRequest(arrow_ipc=b"not arrow"))) == "arrow_ipc"
    retyped = pa.table({"prediction_id": ["bad-t"], "endpoint": ["bad"], "model": ["bad-model"],
                        "version": [version], "time": pa.array([datetime.now(UTC)], pa.timestamp("us")),
                        FEATURES[0]: ["a string"]})
    assert refused(lambda: ingest(stub, pb.IngestPredictionsRequest(arrow_ipc=arrow_ipc(retyped)))) == "arrow_ipc"
    assert rows_of(stub, endpoint="bad") == {("bad-model", version, False): 10}
