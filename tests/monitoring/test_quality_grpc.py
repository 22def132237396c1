"""GetDataQuality and GetDriftReportHtml through gRPC, as real processes (a registry and the
monitoring service) on SQLite and on PostgreSQL: the counts equal numpy's on the rows sent, the
boundaries of the reference's range are in range, a column of another kind is a type mismatch, and
the errors are the drift report's."""

from __future__ import annotations

from datetime import UTC, datetime
from html.parser import HTMLParser

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from strata.monitoring.v1 import monitoring_pb2 as pb

from tests.monitoring.conftest import FEATURES, Platform, arrow_ipc, classifier_onnx
from tests.monitoring.test_monitoring_grpc import ingest, refused, register


def _reference(platform: Platform, name: str, rng: np.random.Generator, n: int = 600) -> dict[str, np.ndarray]:
    ref = {f: rng.normal(size=n) for f in FEATURES}
    ref[FEATURES[0]][:30] = np.nan
    ref["segment"] = rng.choice(np.array(["a", "b", "c"]), n)
    (platform.store / "refs").mkdir(exist_ok=True)
    pq.write_table(pa.table(ref), platform.store / "refs" / f"{name}.parquet")
    return ref


def _batch(endpoint: str, model: str, version: int, ids: list[str], columns: dict[str, object],
           outputs: list[str]) -> pb.IngestPredictionsRequest:
    n = len(ids)
    table = pa.table({"prediction_id": ids, "endpoint": [endpoint] * n, "model": [model] * n, "version": [version] * n,
                      "time": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")), **columns})
    return pb.IngestPredictionsRequest(arrow_ipc=arrow_ipc(table), output_columns=outputs)


def test_data_quality_counts_equal_numpys_per_version(platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(11)
    v1 = register(platform, "quality-model", classifier_onnx())
    v2 = register(platform, "quality-model", classifier_onnx())
    ref = _reference(platform, "quality", rng)
    for v in (v1, v2):
        stub.SetReference(pb.SetReferenceRequest(model="quality-model", version=v, table_uri="refs/quality.parquet",
                                                 columns=[*FEATURES, "segment"],
                                                 prediction_columns={"label": "segment"}))
    lo, hi = np.nanmin(ref[FEATURES[0]]), np.nanmax(ref[FEATURES[0]])
    n = 400
    f0 = np.concatenate((rng.normal(scale=2, size=n - 6), [lo, hi, np.nan, np.inf, -np.inf, hi + 1]))
    labels = rng.choice(np.array(["a", "b", "c", "new", "newer"]), n, p=[0.3, 0.3, 0.2, 0.15, 0.05])
    # Version 1: f2 never sent, a feature nobody profiled, string labels (two categories unseen).
    ingest(stub, _batch("quality", "quality-model", v1, [f"q1-{i}" for i in range(n)],
                        {FEATURES[0]: f0, FEATURES[1]: rng.normal(size=n), FEATURES[3]: rng.normal(size=n),
                         "extra": rng.normal(size=n), "label": labels}, ["label"]))
    # Version 2 (its own endpoint: a column typed differently by two versions of one scan is unified
    # by DuckDB): integer labels against the reference's strings.
    ingest(stub, _batch("quality-b", "quality-model", v2, [f"q2-{i}" for i in range(50)],
                        {f: rng.normal(size=50) for f in FEATURES} | {"label": rng.integers(0, 2, 50)}, ["label"]))

    got = stub.GetDataQuality(pb.GetDataQualityRequest(endpoint="quality"))
    (v,) = got.versions
    assert (v.model, v.version, v.shadow, v.rows) == ("quality-model", v1, False, n)
    assert list(v.missing_columns) == [FEATURES[2]] and list(v.extra_columns) == ["extra"]
    by = {c.column: c for c in v.features}
    assert list(by) == [FEATURES[0], FEATURES[1], FEATURES[3]]
    c = by[FEATURES[0]]
    kept = f0[np.isfinite(f0)]
    assert (c.rows, c.null_rows, c.values) == (n, 3, kept.size)
    assert c.null_share == 3 / n and c.reference_null_share == 30 / 600
    assert (c.reference_min, c.reference_max) == (lo, hi)
    assert c.out_of_range == int(np.count_nonzero((kept < lo) | (kept > hi)))
    assert c.out_of_range_share == c.out_of_range / kept.size
    assert (c.kind, c.role, c.window_type, c.type_mismatches) == (pb.COLUMN_KIND_NUMERIC, pb.COLUMN_ROLE_FEATURE,
                                                                  "double", 0)
    (label,) = v.predictions
    unseen = labels[~np.isin(labels, ["a", "b", "c"])]
    assert (label.column, label.role, label.kind) == ("label", pb.COLUMN_ROLE_PREDICTION, pb.COLUMN_KIND_CATEGORICAL)
    assert (label.unseen_rows, label.unseen_categories, label.unseen_share) == (unseen.size, 2, unseen.size / n)
    assert list(label.unseen_examples) == ["new", "newer"]
    assert got.window.HasField("start_time") and got.window.HasField("end_time")

    (w,) = stub.GetDataQuality(pb.GetDataQualityRequest(model="quality-model", version=v2)).versions
    (label,) = w.predictions
    assert (label.window_type, label.type_mismatches, label.type_mismatch_share, label.unseen_rows) == \
        ("int64", 50, 1.0, 0)


def test_data_quality_errors_are_the_drift_reports(platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(12)
    ingest(stub, _batch("quality-noref", "quality-noref", 1, ["nr-0", "nr-1"],
                        {f: rng.normal(size=2) for f in FEATURES}, []))
    refused(lambda: stub.GetDataQuality(pb.GetDataQualityRequest(endpoint="never")), grpc.StatusCode.NOT_FOUND)
    refused(lambda: stub.GetDataQuality(pb.GetDataQualityRequest(model="quality-noref", version=9)),
            grpc.StatusCode.NOT_FOUND)
    past = pb.TimeWindow(start_time={"seconds": 10**9}, end_time={"seconds": 10**9 + 3600})
    assert refused(lambda: stub.GetDataQuality(pb.GetDataQualityRequest(endpoint="quality-noref", window=past)),
                   grpc.StatusCode.FAILED_PRECONDITION) == "window"
    backwards = pb.TimeWindow(start_time={"seconds": 10**9 + 3600}, end_time={"seconds": 10**9})
    assert refused(lambda: stub.GetDataQuality(pb.GetDataQualityRequest(endpoint="quality-noref",
                                                                        window=backwards))) == "window"
    assert refused(lambda: stub.GetDataQuality(pb.GetDataQualityRequest())) == "endpoint"
    refused(lambda: stub.GetDataQuality(pb.GetDataQualityRequest(endpoint="quality-noref")),
            grpc.StatusCode.FAILED_PRECONDITION)  # no reference
    refused(lambda: stub.GetDriftReportHtml(pb.GetDriftReportRequest(endpoint="quality-noref")),
            grpc.StatusCode.FAILED_PRECONDITION)


class _Verdicts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.columns: list[tuple[str, str]] = []
        self.charts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and "data-column" in a:
            self.columns.append((a["data-role"] or "", a["data-column"] or ""))
        self.charts += tag == "svg"


def test_the_html_drift_report_is_an_html_body_with_every_column(platform: Platform) -> None:
    stub, rng = platform.monitoring(), np.random.default_rng(13)
    version = register(platform, "html-model", classifier_onnx())
    _reference(platform, "html", rng)
    stub.SetReference(pb.SetReferenceRequest(model="html-model", version=version, table_uri="refs/html.parquet",
                                             columns=FEATURES))
    n = 300
    ingest(stub, _batch("html", "html-model", version, [f"h-{i}" for i in range(n)],
                        {f: rng.normal(loc=2.0 if f == FEATURES[1] else 0.0, size=n) for f in FEATURES}, []))
    body = stub.GetDriftReportHtml(pb.GetDriftReportRequest(endpoint="html"))
    assert body.content_type == "text/html; charset=utf-8"
    page = body.data.decode()
    parsed = _Verdicts()
    parsed.feed(page)
    assert parsed.columns == [("feature", f) for f in FEATURES] and parsed.charts == len(FEATURES)
    (report,) = stub.GetDriftReport(pb.GetDriftReportRequest(endpoint="html")).versions
    assert [f.column for f in report.features if f.drifted] == [FEATURES[1]]
    assert f"models/html-model/versions/{version}" in page and "dataset drift" in page.lower()
