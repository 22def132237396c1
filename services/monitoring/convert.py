"""strata.monitoring.v1 <-> the monitoring service's plain types (types.py), beside the servicer."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
from google.api import httpbody_pb2
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError
from strata.inference.v1 import inference_pb2 as ipb
from strata.monitoring.v1 import monitoring_pb2 as pb

from services.common.convert import NUMERIC_DATA_TYPES, timestamp_pb
from services.common.errors import InvalidArgument, UndecodableRequest, quote
from services.common.limits import check_timestamp, timestamp_from_pb
from services.monitoring import wire
from services.monitoring.drift import ColumnKind, FeatureDrift, Method, Override
from services.monitoring.types import (
    ArrowBatch, ClassificationMetrics, ColumnQuality, DriftQuery, DriftReport, IngestResult, Label, PerformanceQuery,
    PerformanceReport, QualityQuery, QualityReport, RecordGroup, Reference, ReferenceRequest, Role, Target, Task,
    VersionDrift, VersionPerformance, VersionQuality, Window,
)

NUMPY_OF = NUMERIC_DATA_TYPES  # the tensors a prediction record may hold (no strings)
METHODS = {pb.DRIFT_METHOD_KS: Method.KS, pb.DRIFT_METHOD_CHISQUARE: Method.CHISQUARE, pb.DRIFT_METHOD_Z: Method.Z,
           pb.DRIFT_METHOD_WASSERSTEIN: Method.WASSERSTEIN, pb.DRIFT_METHOD_JENSENSHANNON: Method.JENSENSHANNON,
           pb.DRIFT_METHOD_PSI: Method.PSI}
METHOD_PB = {m: n for n, m in METHODS.items()}
KIND_PB = {ColumnKind.NUMERIC: pb.COLUMN_KIND_NUMERIC, ColumnKind.CATEGORICAL: pb.COLUMN_KIND_CATEGORICAL}
ROLE_PB = {Role.FEATURE: pb.COLUMN_ROLE_FEATURE, Role.PREDICTION: pb.COLUMN_ROLE_PREDICTION}


#: Dimensions of a logged tensor (rows first): numpy's limit is 64, a model's tensors have a few.
MAX_TENSOR_DIMS = 8


def _time(ts: timestamp_pb2.Timestamp, present: bool, field: str) -> datetime | None:
    return timestamp_from_pb(ts, field) if present else None


# -- ingestion -----------------------------------------------------------------------------------

def batch(data: bytes) -> list[RecordGroup] | ArrowBatch:
    """One message of the ingestion stream, as the bytes gRPC received (see server.register), as a
    batch: records through wire.py, those it does not read through the protobuf runtime."""
    req = wire.split(data)
    if req.records and req.arrow_ipc:
        raise InvalidArgument("arrow_ipc", "give records or arrow_ipc, not both")
    if req.arrow_ipc:
        return ArrowBatch(req.arrow_ipc, tuple(req.output_columns))
    if req.output_columns:
        raise InvalidArgument("output_columns", "names columns of arrow_ipc; records name their outputs")
    if not req.records:
        raise InvalidArgument("records", "give records or arrow_ipc")
    groups, others = wire.record_groups(data, req.records, NUMPY_OF)
    if others:
        try:
            parsed = [ipb.PredictionRecord.FromString(data[slice(*req.records[i])]) for i in others]
        except DecodeError as e:
            raise UndecodableRequest(f"a record does not decode as strata.inference.v1.PredictionRecord: "
                                     f"{str(e).rsplit(': ', 1)[-1][:200]}") from None
        groups += record_groups(parsed, others)
    return groups


class _Group:
    __slots__ = ("head", "request_ids", "rows", "times", "errors", "positions", "inputs", "outputs")

    def __init__(self, head: tuple, n_inputs: int, n_outputs: int) -> None:
        self.head = head
        self.request_ids: list[str] = []
        self.rows: list[int] = []
        self.times: list[int] = []
        self.errors: list[str] = []
        self.positions: list[int] = []
        self.inputs: list[list[ipb.Tensor]] = [[] for _ in range(n_inputs)]
        self.outputs: list[list[ipb.Tensor]] = [[] for _ in range(n_outputs)]


def record_groups(records: Sequence[ipb.PredictionRecord], positions: Sequence[int]) -> list[RecordGroup]:
    """Prediction log records grouped by layout (types.RecordGroup), each tensor's records joined;
    `positions`: each record's index in its message."""
    groups: dict[tuple, _Group] = {}
    for i, r in zip(positions, records, strict=True):
        inputs, outputs = r.inputs, r.outputs
        tensors = [*inputs, *outputs]
        if not tensors:
            raise InvalidArgument(f"records[{i}].inputs", "a record has at least one tensor")
        layout = tuple((t.name, t.dtype, tuple(t.shape[1:])) for t in tensors)
        key = (r.endpoint, r.model, r.version, r.shadow, len(inputs), layout)
        g = groups.get(key)
        if g is None:
            g = groups[key] = _Group(key, len(inputs), len(outputs))
        n = tensors[0].shape[0] if tensors[0].shape else -1
        for j, t in enumerate(tensors):
            where = f"records[{i}].inputs[{j}]" if j < len(inputs) else f"records[{i}].outputs[{j - len(inputs)}]"
            if len(t.shape) > MAX_TENSOR_DIMS:
                raise InvalidArgument(f"{where}.shape", f"has {len(t.shape)} dimensions; at most {MAX_TENSOR_DIMS}")
            if not t.shape or t.shape[0] != n:
                raise InvalidArgument(where, f"has shape {quote(list(t.shape))}; every tensor of a record has "
                                             f"its rows first, and the same number ({n})")
        g.request_ids.append(r.request_id)
        g.rows.append(n)
        g.times.append(check_timestamp(r.time.seconds, r.time.nanos, f"records[{i}].time"))
        g.errors.append(r.error)
        g.positions.append(i)
        for j, t in enumerate(inputs):
            g.inputs[j].append(t)
        for j, t in enumerate(outputs):
            g.outputs[j].append(t)
    out = []
    for g in groups.values():
        endpoint, model, version, shadow, _, _ = g.head
        rows = np.array(g.rows, dtype=np.int64)
        out.append(RecordGroup(
            endpoint, model, version, shadow, g.request_ids, rows, np.array(g.times, dtype=np.int64), g.errors,
            [(ts[0].name, _values(ts, rows, g.positions, f"inputs[{j}]")) for j, ts in enumerate(g.inputs)],
            [(ts[0].name, _values(ts, rows, g.positions, f"outputs[{j}]")) for j, ts in enumerate(g.outputs)],
            g.positions))
    return out


def _values(tensors: list[ipb.Tensor], rows: np.ndarray, positions: list[int], where: str) -> np.ndarray:
    """One tensor of a group's records, concatenated along the rows."""
    tail = tuple(tensors[0].shape[1:])
    per_row = int(np.prod(tail, dtype=np.int64))
    parts = []
    for t, n, pos in zip(tensors, rows.tolist(), positions, strict=True):
        field = f"records[{pos}].{where}"
        dtype = NUMPY_OF.get(t.dtype)
        if t.raw:
            if dtype is None:
                raise InvalidArgument(f"{field}.dtype", f"raw values need a numeric dtype; got {t.dtype}")
            if len(t.raw) != n * per_row * dtype.itemsize:
                raise InvalidArgument(f"{field}.raw", f"holds {len(t.raw)} bytes; shape {quote(list(t.shape))} of "
                                                      f"{dtype} needs {n * per_row * dtype.itemsize}")
            part = np.frombuffer(t.raw, dtype)
        elif t.string_values:
            part = np.array(list(t.string_values), dtype=object)
        else:
            part = np.array(t.float_values or t.int_values or t.bool_values, dtype=dtype)
        if part.size != n * per_row:
            raise InvalidArgument(field, f"holds {part.size} values; shape {quote(list(t.shape))} needs {n * per_row}")
        parts.append(part)
    return (np.concatenate(parts) if len(parts) > 1 else parts[0]).reshape((int(rows.sum()), *tail))


# -- ground truth and references -----------------------------------------------------------------

def labels(request: pb.ReportGroundTruthRequest) -> list[Label]:
    out = []
    for i, x in enumerate(request.labels):
        kind = x.WhichOneof("value")
        out.append(Label(x.prediction_id, x.number if kind == "number" else None,
                         x.category if kind == "category" else None,
                         _time(x.time, x.HasField("time"), f"labels[{i}].time")))
    return out


def reference_request(r: pb.SetReferenceRequest) -> ReferenceRequest:
    return ReferenceRequest(r.model, r.version, r.table_uri, tuple(r.columns), dict(r.prediction_columns))


def reference_pb(r: Reference) -> pb.Reference:
    return pb.Reference(
        model=r.model, version=r.version, table_uri=r.table_uri, from_lineage=r.from_lineage,
        table_sha256=r.table_sha256, rows=r.rows, created_by=r.created_by, create_time=timestamp_pb(r.create_time),
        columns=[pb.ReferenceColumn(name=c.name, source_column=c.source_column, role=ROLE_PB[c.role],
                                    kind=KIND_PB[c.kind], rows=c.rows, null_share=c.null_share,
                                    distinct_values=c.distinct_values) for c in r.columns])


# -- reports -------------------------------------------------------------------------------------

Targeted = pb.GetDriftReportRequest | pb.GetPerformanceRequest | pb.GetDataQualityRequest


def _target(r: Targeted) -> Target:
    return Target(r.endpoint, r.model, r.version)


def _window(r: Targeted) -> tuple[datetime | None, datetime | None]:
    w = r.window
    return (_time(w.start_time, w.HasField("start_time"), "window.start_time"),
            _time(w.end_time, w.HasField("end_time"), "window.end_time"))


def window_pb(w: Window) -> pb.TimeWindow:
    return pb.TimeWindow(start_time=timestamp_pb(w.start), end_time=timestamp_pb(w.end))


def drift_query(r: pb.GetDriftReportRequest) -> DriftQuery:
    overrides = {}
    for name, o in r.overrides.items():
        if o.method and o.method not in METHODS:
            raise InvalidArgument(f"overrides[{quote(name)}].method", f"unknown method {o.method}")
        overrides[name] = Override(METHODS.get(o.method), o.threshold if o.HasField("threshold") else None)
    return DriftQuery(_target(r), *_window(r), overrides, r.drift_share or 0.5)


def _column_pb(f: FeatureDrift) -> pb.ColumnDrift:
    return pb.ColumnDrift(column=f.name, kind=KIND_PB[f.kind], method=METHOD_PB[f.method], score=f.score,
                          statistic=f.statistic, threshold=f.threshold, drifted=f.drifted, psi=f.psi,
                          reference_rows=f.n_reference, current_rows=f.n_current, distinct_values=f.n_unique,
                          null_share=f.null_share, reference_null_share=f.reference_null_share)


def _version_drift_pb(v: VersionDrift) -> pb.VersionDrift:
    d = v.features
    return pb.VersionDrift(model=v.model, version=v.version, shadow=v.shadow, rows=v.rows,
                           features=[_column_pb(f) for f in d.features],
                           predictions=[_column_pb(f) for f in v.predictions], drifted_features=d.n_drifted,
                           share_drifted=d.share_drifted, drift_share=d.drift_share,
                           dataset_drifted=d.dataset_drifted, missing_columns=list(v.missing_columns))


def drift_pb(report: DriftReport) -> pb.GetDriftReportResponse:
    return pb.GetDriftReportResponse(window=window_pb(report.window),
                                     versions=[_version_drift_pb(v) for v in report.versions])


HTML = "text/html; charset=utf-8"


def html_pb(page: str) -> httpbody_pb2.HttpBody:
    return httpbody_pb2.HttpBody(content_type=HTML, data=page.encode())


def quality_query(r: pb.GetDataQualityRequest) -> QualityQuery:
    return QualityQuery(_target(r), *_window(r))


def _column_quality_pb(c: ColumnQuality) -> pb.ColumnQuality:
    return pb.ColumnQuality(
        column=c.name, role=ROLE_PB[c.role], kind=KIND_PB[c.kind], window_type=c.window_type, rows=c.rows,
        values=c.values, null_rows=c.null_rows, null_share=c.null_share, reference_null_share=c.reference_null_share,
        out_of_range=c.out_of_range, out_of_range_share=c.share(c.out_of_range), reference_min=c.reference_min,
        reference_max=c.reference_max, type_mismatches=c.type_mismatches,
        type_mismatch_share=c.share(c.type_mismatches), unseen_rows=c.unseen_rows,
        unseen_share=c.share(c.unseen_rows), unseen_categories=c.unseen_categories,
        unseen_examples=list(c.unseen_examples))


def _version_quality_pb(v: VersionQuality) -> pb.VersionQuality:
    return pb.VersionQuality(model=v.model, version=v.version, shadow=v.shadow, rows=v.rows,
                             features=[_column_quality_pb(c) for c in v.features],
                             predictions=[_column_quality_pb(c) for c in v.predictions],
                             missing_columns=list(v.missing_columns), extra_columns=list(v.extra_columns))


def quality_pb(report: QualityReport) -> pb.GetDataQualityResponse:
    return pb.GetDataQualityResponse(window=window_pb(report.window),
                                     versions=[_version_quality_pb(v) for v in report.versions])


def performance_query(r: pb.GetPerformanceRequest) -> PerformanceQuery:
    if r.task not in (pb.TASK_UNSPECIFIED, pb.TASK_CLASSIFICATION, pb.TASK_REGRESSION):
        raise InvalidArgument("task", f"unknown task {r.task}")
    return PerformanceQuery(_target(r), *_window(r), Task(r.task), r.prediction_output, r.score_output,
                            tuple(r.class_labels))


def _version_performance_pb(v: VersionPerformance) -> pb.VersionPerformance:
    out = pb.VersionPerformance(model=v.model, version=v.version, shadow=v.shadow, rows=v.rows,
                                labeled_rows=v.labeled_rows, label_coverage=v.label_coverage, task=int(v.task),
                                note=v.note)
    m = v.metrics
    if isinstance(m, ClassificationMetrics):
        out.classification.CopyFrom(pb.ClassificationMetrics(
            accuracy=m.accuracy, precision=m.precision, recall=m.recall, f1=m.f1, roc_auc=m.roc_auc,
            log_loss=m.log_loss, classes=list(m.classes), average=m.average, positive_class=m.positive_class))
    elif m is not None:
        out.regression.CopyFrom(pb.RegressionMetrics(mae=m.mae, rmse=m.rmse, mape=m.mape, r2=m.r2))
    return out


def performance_pb(report: PerformanceReport) -> pb.GetPerformanceResponse:
    return pb.GetPerformanceResponse(window=window_pb(report.window),
                                     versions=[_version_performance_pb(v) for v in report.versions])


def ingest_pb(result: IngestResult) -> pb.IngestPredictionsResponse:
    return pb.IngestPredictionsResponse(received=result.received, stored=result.stored,
                                        duplicates=result.duplicates)
