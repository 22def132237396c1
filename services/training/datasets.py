"""The rows a job trains on: a Parquet table on the artifact store (or a training set the feature
store builds for it), as a float32 matrix in column order, the labels, and the lineage the
registry records (dataset hash, location, feature view versions, feature set).

Paths come from requests: each one passes services/common/paths.Confinement before anything is
opened. The hash is the sha256 of the Parquet bytes (files in name order), so the same table
gives the same hash wherever it is read."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.common.errors import InvalidArgument, quote
from services.common.paths import Confinement, Place
from services.training.types import DatasetSpec, Split, Task, ValidationSpec


@dataclass(frozen=True)
class BuiltTrainingSet:
    """What the feature store made for a job: where, and from which view versions."""

    uri: str
    feature_views: tuple[str, ...]
    feature_columns: tuple[str, ...]      # "{view}__{feature}", in the order asked
    feature_refs: tuple[str, ...] = ()    # "{view}:{feature}" of each column


class FeatureSource(Protocol):
    """The feature store as training needs it (services/training/feature_source.py over gRPC)."""

    def check(self, spec: DatasetSpec) -> None:
        """INVALID_ARGUMENT naming the field when the feature set does not exist."""

    def build_training_set(self, spec: DatasetSpec, output_uri: str, principal: str) -> BuiltTrainingSet: ...


@dataclass
class Dataset:
    X: np.ndarray                         # float32, rows x columns
    y: np.ndarray
    columns: list[str]
    time: np.ndarray | None               # the split's time column, when it splits by time
    sha256: str
    uri: str
    feature_views: list[str] = field(default_factory=list)
    feature_set: str = ""
    #: "{view}:{feature}" of each column, for a training set: what serving by entity key reads.
    features: list[str] = field(default_factory=list)


def _table_files(confinement: Confinement, place: Place, field_name: str) -> list[str]:
    """The Parquet files of a checked local place: a directory's *.parquet, or a file or glob."""
    if os.path.isdir(place.path):
        return sorted(os.path.join(place.path, f) for f in os.listdir(place.path) if f.endswith(".parquet"))
    return confinement.expand(place, field_name)


def _read(confinement: Confinement, uri: str, field_name: str) -> tuple[pa.Table, str]:
    place = confinement.readable(uri, field_name)
    if place.remote:
        raise InvalidArgument(field_name, "S3 datasets are not read by the training service yet; "
                              "use the artifact store's local root")
    files = _table_files(confinement, place, field_name)
    if not files or not all(os.path.isfile(f) for f in files):
        raise InvalidArgument(field_name, f"{quote(uri)} is not a readable Parquet table")
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files])
    except (pa.ArrowInvalid, OSError) as e:
        raise InvalidArgument(field_name, f"{quote(uri)} is not a readable Parquet table: {quote(str(e))}") from None
    return table, digest.hexdigest()


def load(spec: DatasetSpec, validation: ValidationSpec, confinement: Confinement, features: FeatureSource | None,
         principal: str, job_id: str) -> Dataset:
    feature_views: list[str] = []
    drop = set(spec.exclude_columns)
    keep: tuple[str, ...] = ()
    refs: dict[str, str] = {}  # training set column -> its feature reference
    if spec.from_features:
        if features is None:
            raise InvalidArgument("spec.dataset.features", "this training service has no feature store configured "
                                  "(STRATA_FEATURES_ADDR)")
        built = features.build_training_set(spec, f"training-sets/jobs/{job_id}.parquet", principal)
        uri, feature_views, keep = built.uri, list(built.feature_views), built.feature_columns
        refs = dict(zip(built.feature_columns, built.feature_refs, strict=True))
        field_name = "spec.dataset.features.entity_table_uri"
    else:
        uri, field_name = spec.table_uri, "spec.dataset.table.uri"
    table, sha = _read(confinement, uri, field_name)
    names = table.column_names
    if spec.label_column not in names:
        raise InvalidArgument("spec.dataset.label_column", f"the dataset has no column {quote(spec.label_column)}; "
                              f"it has {names[:20]}")
    time_col = validation.time_column if validation.split == Split.TIME else ""
    if time_col and time_col not in names:
        raise InvalidArgument("spec.validation.time_column", f"the dataset has no column {quote(time_col)}")
    if keep:  # a training set: the features asked for, not the entity table's keys and times
        columns = [c for c in keep if c not in drop]
    else:
        columns = [c for c in names if c != spec.label_column and c not in drop and c != time_col]
    if not columns:
        raise InvalidArgument("spec.dataset", "no feature columns are left")
    matrix = []
    for c in columns:
        col = table.column(c)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)):
            raise InvalidArgument("spec.dataset.exclude_columns", f"column {quote(c)} is {col.type}: only numeric and "
                                  "boolean columns are features (exclude it, or encode it as numbers)")
        matrix.append(col.to_numpy(zero_copy_only=False).astype(np.float32))
    X = np.column_stack(matrix) if matrix else np.empty((table.num_rows, 0), np.float32)
    label = table.column(spec.label_column)
    y = label.to_numpy(zero_copy_only=False)
    if label.null_count or (y.dtype.kind == "f" and np.isnan(y).any()):
        raise InvalidArgument("spec.dataset.label_column", f"column {quote(spec.label_column)} has missing labels")
    t = table.column(time_col).to_numpy(zero_copy_only=False) if time_col else None
    return Dataset(X=X, y=y, columns=columns, time=t, sha256=sha, uri=uri, feature_views=feature_views,
                   feature_set=spec.feature_set, features=[refs[c] for c in columns] if refs else [])


def check_table(spec: DatasetSpec, confinement: Confinement) -> None:
    """At submit: a table dataset is readable and has its label column (its schema only is read)."""
    if not spec.table_uri:
        return
    place = confinement.readable(spec.table_uri, "spec.dataset.table.uri")
    if place.remote:
        return
    files = _table_files(confinement, place, "spec.dataset.table.uri")
    try:
        names = pq.read_schema(files[0]).names if files else None
    except (pa.ArrowInvalid, OSError):
        names = None
    if names is None:
        raise InvalidArgument("spec.dataset.table.uri", f"{quote(spec.table_uri)} is not a readable Parquet table")
    if spec.label_column not in names:
        raise InvalidArgument("spec.dataset.label_column", f"the table has no column {quote(spec.label_column)}; "
                              f"it has {names[:20]}")


def split(n: int, y: np.ndarray, task: Task, v: ValidationSpec, time: np.ndarray | None,
          fraction: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) as index arrays, as the validation spec says."""
    from sklearn.model_selection import train_test_split

    fraction = v.holdout_fraction if fraction is None else fraction
    index = np.arange(n)
    mode = v.split or (Split.STRATIFIED if task == Task.CLASSIFICATION else Split.RANDOM)
    if mode == Split.TIME:
        order = np.argsort(time[index] if time is not None else index, kind="stable")
        cut = int(round(n * (1 - fraction)))
        return index[order[:cut]], index[order[cut:]]
    stratify = y if mode == Split.STRATIFIED else None
    if stratify is not None and np.min(np.unique(y, return_counts=True)[1]) < 2:
        stratify = None  # a class with one row cannot be split both ways
    train, held = train_test_split(index, test_size=fraction, random_state=v.seed, stratify=stratify)
    return np.sort(train), np.sort(held)


def folds(y: np.ndarray, task: Task, v: ValidationSpec, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (fit rows, validation rows) folds: stratified for classification, seeded."""
    from sklearn.model_selection import KFold, StratifiedKFold

    if task == Task.CLASSIFICATION and np.min(np.unique(y, return_counts=True)[1]) >= k:
        splitter = StratifiedKFold(k, shuffle=True, random_state=v.seed)
    else:
        splitter = KFold(k, shuffle=True, random_state=v.seed)
    return [(np.sort(f), np.sort(t)) for f, t in splitter.split(np.zeros(len(y)), y)]
