"""Plain types of the monitoring service: what the servicer converts protobuf messages into and
back from. No protobuf here."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from services.monitoring.drift import ColumnKind, DatasetDrift, FeatureDrift, Override


# -- ingestion -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordGroup:
    """Prediction log records of one layout (endpoint, model, version, shadow flag, and the same
    tensor names, dtypes and trailing dimensions), as columns: each tensor is the records' tensors
    concatenated along the first (row) dimension, records in stream order."""

    endpoint: str
    model: str
    version: int
    shadow: bool
    request_ids: list[str]
    rows: np.ndarray            # rows of each record (its tensors' first dimension), int64
    times_us: np.ndarray        # each record's time, microseconds since the epoch (UTC), int64
    errors: list[str]           # each record's error message ("" when it scored)
    inputs: list[tuple[str, np.ndarray]]
    outputs: list[tuple[str, np.ndarray]]
    positions: list[int]        # each record's index in its message, for error messages


@dataclass(frozen=True)
class ArrowBatch:
    """A columnar batch from a bulk client: Arrow IPC stream bytes and which columns are outputs."""

    data: bytes
    output_columns: tuple[str, ...]


@dataclass(frozen=True)
class IngestResult:
    received: int
    stored: int

    @property
    def duplicates(self) -> int:
        return self.received - self.stored


# -- ground truth --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Label:
    """The observed outcome of one prediction: a number or a category (exactly one is set)."""

    prediction_id: str
    number: float | None
    category: str | None
    time: datetime | None       # when it was observed; None: when reported


# -- references ----------------------------------------------------------------------------------

class Role(enum.StrEnum):
    FEATURE = "feature"
    PREDICTION = "prediction"


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the registry's signature declares it (-1: dynamic)."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """What the monitoring service reads of a registered model version."""

    model: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dataset_uri: str            # the training set of its lineage ("" when none)
    features: tuple[str, ...] = ()  # the lineage's "{view}:{feature}" per model input column, in order


@dataclass(frozen=True)
class ReferenceRequest:
    model: str
    version: int
    table_uri: str              # "" : the lineage's training set
    columns: tuple[str, ...]
    prediction_columns: Mapping[str, str]   # output column -> table column


@dataclass(frozen=True)
class ReferenceColumn:
    name: str                   # the model's column (feature, or output)
    source_column: str          # the table column it was read from
    role: Role
    kind: ColumnKind
    rows: int                   # non-missing values profiled
    null_share: float
    distinct_values: int

    def to_dict(self) -> dict:
        return {"name": self.name, "source_column": self.source_column, "role": str(self.role),
                "kind": str(self.kind), "rows": self.rows, "null_share": self.null_share,
                "distinct_values": self.distinct_values}

    @classmethod
    def from_dict(cls, d: Mapping) -> ReferenceColumn:
        return cls(d["name"], d["source_column"], Role(d["role"]), ColumnKind(d["kind"]), int(d["rows"]),
                   float(d["null_share"]), int(d["distinct_values"]))


@dataclass(frozen=True)
class Reference:
    model: str
    version: int
    table_uri: str
    from_lineage: bool
    table_sha256: str
    rows: int
    columns: tuple[ReferenceColumn, ...]
    created_by: str
    create_time: datetime


# -- reports -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Which predictions a report covers: an endpoint's, a model version's, or a model version's
    on an endpoint."""

    endpoint: str
    model: str
    version: int


@dataclass(frozen=True)
class Window:
    """[start, end) of prediction times, aware UTC datetimes."""

    start: datetime
    end: datetime


@dataclass(frozen=True)
class DriftQuery:
    target: Target
    start: datetime | None      # None: a day before `end`
    end: datetime | None        # None: now
    overrides: Mapping[str, Override] = field(default_factory=dict)
    drift_share: float = 0.5


@dataclass(frozen=True)
class VersionDrift:
    model: str
    version: int
    shadow: bool
    rows: int
    features: DatasetDrift
    predictions: tuple[FeatureDrift, ...]
    missing_columns: tuple[str, ...]


@dataclass(frozen=True)
class DriftReport:
    window: Window
    versions: tuple[VersionDrift, ...]


class Task(enum.IntEnum):
    """The proto's numbers."""

    UNSPECIFIED = 0
    CLASSIFICATION = 1
    REGRESSION = 2


@dataclass(frozen=True)
class PerformanceQuery:
    target: Target
    start: datetime | None
    end: datetime | None
    task: Task = Task.UNSPECIFIED
    prediction_output: str = ""
    score_output: str = ""
    class_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassificationMetrics:
    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float | None
    log_loss: float | None
    classes: tuple[str, ...]
    average: str                # "binary" or "macro"
    positive_class: str


@dataclass(frozen=True)
class RegressionMetrics:
    mae: float
    rmse: float
    mape: float
    r2: float | None


@dataclass(frozen=True)
class VersionPerformance:
    model: str
    version: int
    shadow: bool
    rows: int
    labeled_rows: int
    task: Task
    metrics: ClassificationMetrics | RegressionMetrics | None
    note: str = ""

    @property
    def label_coverage(self) -> float:
        return self.labeled_rows / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class PerformanceReport:
    window: Window
    versions: tuple[VersionPerformance, ...]


# -- data quality --------------------------------------------------------------------------------

@dataclass(frozen=True)
class QualityQuery:
    target: Target
    start: datetime | None
    end: datetime | None


@dataclass(frozen=True)
class ColumnQuality:
    """One profiled column of a model version's rows in a window, against its reference. Counts
    other than `null_rows` are of the non-missing values (`values`)."""

    name: str
    role: Role
    kind: ColumnKind            # as profiled in the reference
    window_type: str            # the stored Arrow type of the window's values ("double", "string", ...)
    rows: int
    null_rows: int              # null, NaN or infinite
    reference_null_share: float
    out_of_range: int           # numeric reference: outside [reference_min, reference_max]
    reference_min: float | None
    reference_max: float | None
    type_mismatches: int        # values of another kind than the reference's (text against numbers, ...)
    unseen_rows: int            # categorical reference: values of a category it never had
    unseen_categories: int      # ... distinct
    unseen_examples: tuple[str, ...]  # up to 10, the most frequent first

    @property
    def values(self) -> int:
        return self.rows - self.null_rows

    @property
    def null_share(self) -> float:
        return self.null_rows / self.rows if self.rows else 0.0

    def share(self, count: int) -> float:
        """`count` as a share of the non-missing values."""
        return count / self.values if self.values else 0.0


@dataclass(frozen=True)
class VersionQuality:
    model: str
    version: int
    shadow: bool
    rows: int
    features: tuple[ColumnQuality, ...]
    predictions: tuple[ColumnQuality, ...]
    missing_columns: tuple[str, ...]   # reference columns with no value in the window
    extra_columns: tuple[str, ...]     # window columns the reference does not profile


@dataclass(frozen=True)
class QualityReport:
    window: Window
    versions: tuple[VersionQuality, ...]


# -- the HTML drift report -----------------------------------------------------------------------

@dataclass(frozen=True)
class Histogram:
    """Reference and window counts over the same bins: for a numeric column `edges` (len(counts) + 1,
    as numpy.histogram's) and no labels; for a categorical one a label per bin (the top
    categories, then the rest as one bin) and no edges."""

    reference: np.ndarray       # int64 counts
    current: np.ndarray
    edges: np.ndarray | None = None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class VersionDriftView:
    """A version's drift with the histograms of its columns (by column name; features and outputs
    apart, as their names may coincide)."""

    drift: VersionDrift
    feature_histograms: Mapping[str, Histogram]
    prediction_histograms: Mapping[str, Histogram]
