"""Drift, data quality and performance over a window of stored predictions.

Each reads the target's rows in the window (`PredictionStore.scan`) and reports per model version
and shadow flag: an endpoint's A/B arms, canary and shadow targets side by side, each against its
own reference. A window is [start, end) of prediction times; end defaults to now, start to a day
before end.

Errors: no endpoint and no model (or a bad name, a version out of range) is INVALID_ARGUMENT
naming the field; start not before end is INVALID_ARGUMENT naming `window`; an endpoint or version
never ingested (and, for a version, without a reference) is NOT_FOUND; a window without rows is
FAILED_PRECONDITION naming `window`; a version without a reference is FAILED_PRECONDITION.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from services.common.limits import check_version
from services.common.names import check_name
from services.monitoring import html_report, metrics
from services.monitoring.drift import DatasetDrift, FeatureDrift, Override, ReferenceProfile, drift_report
from services.monitoring.labels import GroundTruthStore
from services.monitoring.quality import present_columns, version_quality
from services.monitoring.references import Profiles, ReferenceStore, version_name
from services.monitoring.rows import ID, INPUT, MODEL, OUTPUT, SHADOW, VERSION, column_values
from services.monitoring.store import PredictionStore
from services.monitoring.types import (
    DriftQuery, DriftReport, Histogram, PerformanceQuery, PerformanceReport, QualityQuery, QualityReport, Target, Task,
    VersionDrift, VersionDriftView, VersionPerformance, Window,
)

DEFAULT_WINDOW = timedelta(days=1)


def resolve_window(start: datetime | None, end: datetime | None, now: datetime) -> Window:
    end = end or now
    start = start or end - DEFAULT_WINDOW
    if start >= end:
        raise InvalidArgument("window", f"start_time {start.isoformat()} is not before end_time {end.isoformat()}")
    return Window(start, end)


def _describe(target: Target) -> str:
    parts = []
    if target.endpoint:
        parts.append(f"endpoints/{quote(target.endpoint, bare=True)}")
    if target.model:
        parts.append(version_name(target.model, target.version))
    return " on ".join(reversed(parts))


def _rows(store: PredictionStore, references: ReferenceStore, target: Target, window: Window,
          columns: Callable[[str], bool] | None = None) -> pa.Table:
    """The target's rows in the window, with the errors of the module docstring."""
    if target.endpoint:
        check_name(target.endpoint, "endpoint")
    if target.model or target.version:
        check_name(target.model, "model")
        check_version(target.version, "version")
    if not target.endpoint and not target.model:
        raise InvalidArgument("endpoint", "give an endpoint, or a model and version (or all three)")
    if not store.knows(target) and (target.endpoint or not references.exists(target.model, target.version)):
        raise NotFound(f"{_describe(target)}: no predictions were ever ingested")
    table = store.scan(target, window, columns)
    if table.num_rows == 0:
        raise FailedPrecondition(f"window: {_describe(target)} has no predictions from {window.start.isoformat()} "
                                 f"to {window.end.isoformat()}", field="window")
    return table


def _groups(table: pa.Table) -> list[tuple[tuple[str, int, bool], pa.Table]]:
    """The rows by (model, version, shadow), in that order."""
    keys = table.group_by([MODEL, VERSION, SHADOW], use_threads=False).aggregate([]).to_pylist()
    out = []
    for k in sorted((k[MODEL], k[VERSION], k[SHADOW]) for k in keys):
        mask = pc.and_(pc.and_(pc.equal(table[MODEL], k[0]), pc.equal(table[VERSION], k[1])),
                       pc.equal(table[SHADOW], k[2]))
        out.append((k, table.filter(mask)))
    return out


_present = present_columns


# -- drift ---------------------------------------------------------------------------------------

def drift(store: PredictionStore, references: ReferenceStore, q: DriftQuery, now: datetime) -> DriftReport:
    window, versions = _drift(store, references, q, now)
    return DriftReport(window, tuple(v for v, _, _ in versions))


def drift_html(store: PredictionStore, references: ReferenceStore, q: DriftQuery, now: datetime) -> str:
    """The drift report as a self-contained HTML page, with each column's histograms (html_report)."""
    window, versions = _drift(store, references, q, now)
    views = []
    for v, rows, profiles in versions:
        features = _histograms(rows, profiles.features, INPUT, v.features.features)
        predictions = (_histograms(rows, profiles.predictions, OUTPUT, v.predictions)
                       if v.predictions and profiles.predictions is not None else {})
        views.append(VersionDriftView(v, features, predictions))
    return html_report.render(DriftReport(window, tuple(v.drift for v in views)), views)


def _histograms(rows: pa.Table, profile: ReferenceProfile, prefix: str,
                columns: tuple[FeatureDrift, ...]) -> dict[str, Histogram]:
    return {f.name: html_report.column_histogram(profile.columns[f.name], column_values(rows.column(prefix + f.name)))
            for f in columns}


def _drift(store: PredictionStore, references: ReferenceStore, q: DriftQuery,
           now: datetime) -> tuple[Window, list[tuple[VersionDrift, pa.Table, Profiles]]]:
    """The report's versions, each with its rows and profiles (for what is drawn from them)."""
    if not 0 < q.drift_share <= 1:
        raise InvalidArgument("drift_share", f"must be in (0, 1]; got {q.drift_share}")
    window = resolve_window(q.start, q.end, now)
    table = _rows(store, references, q.target, window)
    groups = [(key, rows, references.profiles(key[0], key[1])) for key, rows in _groups(table)]
    profiled = {n for _, _, p in groups for profile in (p.features, p.predictions) if profile
                for n in profile.columns}
    for name in q.overrides:
        if name not in profiled:
            raise InvalidArgument(f"overrides[{quote(name)}]", "is not a profiled column of the reference(s): "
                                                             f"{', '.join(quote(n) for n in sorted(profiled)[:20])}")
    versions = []
    for (model, version, shadow), rows, profiles in groups:
        features, missing = _window(rows, profiles.features, INPUT)
        if not features.columns:
            raise FailedPrecondition(f"{version_name(model, version)}: the window's rows have none of the reference's "
                                     "features", field="window")
        report = _report(features, rows, INPUT, q.overrides, q.drift_share)
        predictions: tuple[FeatureDrift, ...] = ()
        if profiles.predictions is not None:
            outputs, missing_outputs = _window(rows, profiles.predictions, OUTPUT)
            missing += missing_outputs
            if outputs.columns:
                predictions = _report(outputs, rows, OUTPUT, q.overrides, q.drift_share).features
        versions.append((VersionDrift(model, version, shadow, rows.num_rows, report, predictions, tuple(missing)),
                         rows, profiles))
    return window, versions


def _window(rows: pa.Table, profile: ReferenceProfile, prefix: str) -> tuple[ReferenceProfile, list[str]]:
    """The profile's columns the rows have, and those they lack."""
    have = set(_present(rows, prefix))
    present = {n: c for n, c in profile.columns.items() if prefix + n in have}
    return ReferenceProfile(MappingProxyType(present)), [n for n in profile.columns if n not in present]


def _report(profile: ReferenceProfile, rows: pa.Table, prefix: str, overrides: Mapping[str, Override],
            drift_share: float) -> DatasetDrift:
    current = {n: column_values(rows.column(prefix + n)) for n in profile.columns}
    mine = {n: o for n, o in overrides.items() if n in profile.columns}
    try:
        return drift_report(profile, current, mine, drift_share)
    except InvalidArgument as e:
        if e.field and e.field.startswith("overrides"):
            raise
        # The window's data does not fit the reference (a column all missing, strings against
        # numbers): not the request's fault.
        raise FailedPrecondition(e.message, field=e.field) from None


# -- data quality --------------------------------------------------------------------------------

def quality(store: PredictionStore, references: ReferenceStore, q: QualityQuery, now: datetime) -> QualityReport:
    """Data quality per model version and shadow flag (quality.py). The request's and the window's
    errors are the drift report's; data that does not fit the reference is counted, not refused."""
    window = resolve_window(q.start, q.end, now)
    table = _rows(store, references, q.target, window)
    groups = [(key, rows, references.profiles(key[0], key[1])) for key, rows in _groups(table)]
    return QualityReport(window, tuple(version_quality(*key, rows, profiles) for key, rows, profiles in groups))


# -- performance ---------------------------------------------------------------------------------

def performance(store: PredictionStore, references: ReferenceStore, labels: GroundTruthStore,
                q: PerformanceQuery, now: datetime) -> PerformanceReport:
    window = resolve_window(q.start, q.end, now)
    table = _rows(store, references, q.target, window, lambda n: n.startswith(OUTPUT))
    truth = labels.lookup(table.column(ID).to_pylist())
    table = table.join(truth, ID, join_type="left outer", use_threads=False)
    versions = [_performance(key, rows, q) for key, rows in _groups(table)]
    return PerformanceReport(window, tuple(versions))


def _performance(key: tuple[str, int, bool], rows: pa.Table, q: PerformanceQuery) -> VersionPerformance:
    model, version, shadow = key
    name = version_name(model, version)
    outputs = [n[len(OUTPUT):] for n in _present(rows, OUTPUT)]
    predicted = q.prediction_output or ("label" if "label" in outputs else outputs[0] if len(outputs) == 1 else "")
    if predicted not in outputs:
        given = "" if q.prediction_output else "; name the one holding the prediction"
        raise InvalidArgument("prediction_output", f"{quote(predicted)} is not an output of {name} "
                                                   f"(its outputs: {outputs[:20]}){given}")
    column = rows.column(OUTPUT + predicted)
    kind = column.type
    task = q.task or (Task.REGRESSION if pa.types.is_floating(kind) else Task.CLASSIFICATION)
    labeled = rows.filter(pc.or_(pc.is_valid(rows["number"]), pc.is_valid(rows["category"])))
    labeled = labeled.filter(pc.is_valid(labeled[OUTPUT + predicted]))
    base = dict(model=model, version=version, shadow=shadow, rows=rows.num_rows, labeled_rows=labeled.num_rows,
                task=task)
    if labeled.num_rows == 0:
        return VersionPerformance(**base, metrics=None, note="no ground truth yet for the window's rows")
    textual = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if labeled["category" if textual else "number"].null_count:  # some label is of the other kind
        what = "categories" if textual else "numbers"
        raise FailedPrecondition(f"{name}: its predictions ({quote(predicted)}) are {what}, and so must its ground "
                                 "truth be", field="prediction_output")
    y_true = labeled["category" if textual else "number"].to_numpy(zero_copy_only=False)
    y_pred = labeled[OUTPUT + predicted]
    if task is Task.REGRESSION:
        if textual:
            raise FailedPrecondition(f"{name}: regression needs numeric predictions", field="task")
        result, note = metrics.regression(y_true.astype(np.float64), y_pred.cast(pa.float64()).to_numpy())
        return VersionPerformance(**base, metrics=result, note=note)
    y_pred = y_pred.to_numpy(zero_copy_only=False).astype(str if textual else np.float64)
    y_true = y_true.astype(str) if textual else y_true.astype(np.float64)
    proba, classes, note = _scores(labeled, outputs, q, textual, y_true, y_pred, name)
    result, why = metrics.classification(y_true, y_pred, proba, classes)
    return VersionPerformance(**base, metrics=result, note=note or why)


def _scores(labeled: pa.Table, outputs: list[str], q: PerformanceQuery, textual: bool, y_true: np.ndarray,
            y_pred: np.ndarray, name: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """The class probabilities of the labelled rows ([rows, classes]) and the classes they are of."""
    score = q.score_output or ("probabilities" if any(_of(o, "probabilities") for o in outputs) else "")
    if not score:
        return None, None, ""
    if score in outputs:  # one column: the probability of the positive (second) class
        columns = [score]
    else:
        columns = []
        while f"{score}[{len(columns)}]" in outputs:
            columns.append(f"{score}[{len(columns)}]")
        if not columns:
            raise InvalidArgument("score_output", f"{quote(score)} is not an output of {name} (its outputs: "
                                                  f"{outputs[:20]})")
    if any(labeled[OUTPUT + c].null_count for c in columns):
        return None, None, "some labelled rows have no probabilities: no ROC AUC or log loss"
    proba = np.column_stack([labeled[OUTPUT + c].cast(pa.float64()).to_numpy() for c in columns])
    if proba.shape[1] == 1:
        proba = np.column_stack((1 - proba[:, 0], proba[:, 0]))
    k = proba.shape[1]
    if q.class_labels:
        if len(q.class_labels) != k:
            raise InvalidArgument("class_labels", f"names {len(q.class_labels)} classes; {name} gives {k} "
                                                  "probability columns")
        if textual:
            return proba, np.array(q.class_labels), ""
        try:
            return proba, np.array([float(c) for c in q.class_labels]), ""
        except ValueError:
            raise InvalidArgument("class_labels", f"{name} predicts numbers; the classes must be numbers") from None
    seen = np.unique(np.concatenate((y_true, y_pred)))
    if seen.size == k:
        return proba, seen, ""
    if not textual and np.all((seen == np.round(seen)) & (seen >= 0) & (seen < k)):
        return proba, np.arange(k, dtype=np.float64), ""
    return None, None, (f"{seen.size} classes seen and {k} probability columns: give class_labels for ROC AUC "
                        "and log loss")


def _of(column: str, tensor: str) -> bool:
    return column == tensor or (column.startswith(tensor + "[") and column.endswith("]"))
