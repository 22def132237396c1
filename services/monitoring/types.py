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
