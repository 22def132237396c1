"""The feature store's plain types: definitions, requests and answers as frozen dataclasses, and
the enums they carry. Nothing here knows protobuf (convert.py translates): the enums keep the
integer values of strata.common.v1.DataType and strata.features.v1's ValueType and FeatureStatus,
so stored definitions, the online row codec and the converters agree. Timestamps are aware UTC
datetimes (services/common/timeutil.py); None is "not set".

Sequences and mappings in requests are read, never copied or changed: the transport may pass
its own containers (protobuf repeated fields and maps) straight through."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


class DataType(enum.IntEnum):
    """Element type of a feature (the feature store uses FLOAT32, FLOAT64, INT32, INT64, BOOL, STRING)."""

    UNSPECIFIED = 0
    FLOAT32 = 1
    FLOAT64 = 2
    FLOAT16 = 3
    BFLOAT16 = 4
    INT8 = 5
    INT16 = 6
    INT32 = 7
    INT64 = 8
    UINT8 = 9
    UINT16 = 10
    UINT32 = 11
    UINT64 = 12
    BOOL = 13
    STRING = 14


class ValueType(enum.IntEnum):
    """Type of an entity's join key."""

    UNSPECIFIED = 0
    INT64 = 1
    STRING = 2


class FeatureStatus(enum.IntEnum):
    """Why a value is or is not there."""

    UNSPECIFIED = 0
    PRESENT = 1
    NOT_FOUND = 2
    EXPIRED = 3
    NULL_VALUE = 4


def type_name(dtype: int) -> str:
    """"FLOAT64" for DataType.FLOAT64; a number no DataType has as itself."""
    try:
        return DataType(dtype).name
    except ValueError:
        return str(dtype)


# -- definitions ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Entity:
    """What features describe (a user, a merchant), with its join key."""

    name: str
    join_key: str = ""  # defaults to the name when applied
    value_type: int = ValueType.UNSPECIFIED
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    create_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class ValidationRule:
    """Constraints on a feature's values, checked on push and materialization."""

    min: float = 0.0
    has_min: bool = False
    max: float = 0.0
    has_max: bool = False
    allowed_values: Sequence[str] = ()  # STRING features; empty: any
    max_null_rate: float = 0.0
    has_max_null_rate: bool = False


@dataclass(frozen=True, slots=True)
class Feature:
    """One typed column of a feature view."""

    name: str
    dtype: int = DataType.UNSPECIFIED  # a DataType (an int the enum lacks is refused when applied)
    description: str = ""
    validation: ValidationRule = field(default_factory=ValidationRule)


@dataclass(frozen=True, slots=True)
class DataSource:
    """Where a view's rows come from offline."""

    path: str = ""
    timestamp_field: str = ""
    created_timestamp_field: str = ""


@dataclass(frozen=True, slots=True)
class FeatureView:
    """A versioned group of features of the same entities."""

    name: str
    version: int = 0  # set by the service
    entities: Sequence[str] = ()
    features: Sequence[Feature] = ()
    ttl_seconds: int = 0  # 0: forever
    source: DataSource = field(default_factory=DataSource)
    owner: str = ""
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None
    created_by: str = ""


@dataclass(frozen=True, slots=True)
class FeatureSet:
    """The feature references a model reads, in its order."""

    name: str
    features: Sequence[str] = ()
    description: str = ""
    owner: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None
    #: Serving's missing-value policy: reference -> the value a missing, expired or null feature
    #: takes when a model is served by entity key; a feature without one refuses the request.
    defaults: Mapping[str, float] = field(default_factory=dict)


# -- online reads and pushes ---------------------------------------------------------------------
class KeyColumn(Protocol):
    """The keys of one join key column, one per entity row (one of the two is filled)."""

    @property
    def int64_values(self) -> Sequence[int]: ...
    @property
    def string_values(self) -> Sequence[str]: ...


@dataclass(frozen=True, slots=True)
class EntityColumn:
    int64_values: Sequence[int] = ()
    string_values: Sequence[str] = ()


class ValueColumn(Protocol):
    """One feature of a push: its values (one list filled, one entry per row) and statuses."""

    @property
    def name(self) -> str: ...
    @property
    def double_values(self) -> Sequence[float]: ...
    @property
    def int64_values(self) -> Sequence[int]: ...
    @property
    def bool_values(self) -> Sequence[bool]: ...
    @property
    def string_values(self) -> Sequence[str]: ...
    @property
    def statuses(self) -> Sequence[int]: ...


@dataclass(slots=True)  # not frozen: a typed read makes one per feature, and frozen ones cost 4x to make
class FeatureValues:
    """One feature for every entity row (columnar): a push's column, or a typed read's answer
    (then with statuses and event times per row; values of rows not PRESENT mean nothing)."""

    name: str
    double_values: Sequence[float] = ()
    int64_values: Sequence[int] = ()
    bool_values: Sequence[bool] = ()
    string_values: Sequence[str] = ()
    statuses: Sequence[int] = ()  # FeatureStatus per row; in a push, empty: all present
    event_timestamps_us: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class OnlineQuery:
    """An online read: feature references "view:feature" (or a feature set's name) for the
    entity rows given as join key -> keys. `raw`: the answer goes out in raw form (wire.py)."""

    features: Sequence[str] = ()
    entities: Mapping[str, KeyColumn] = field(default_factory=dict)
    raw: bool = False
    feature_set: str = ""


@dataclass(frozen=True, slots=True)
class OnlineValues:
    """A typed online answer: one column per requested feature, in the request's order, and the
    version of each view read."""

    features: Sequence[FeatureValues]
    view_versions: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class PushRequest:
    """Rows of one view, columnar: join key -> keys, one column per feature, event times (us)."""

    view: str
    entities: Mapping[str, KeyColumn] = field(default_factory=dict)
    features: Sequence[ValueColumn] = ()
    event_timestamps_us: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class PushResult:
    rows_written: int
    view_version: int


# -- materialization -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MaterializeProgress:
    """One progress report of a materialization; the last has `done` set."""

    rows_written: int = 0
    rows_total: int = 0
    done: bool = False
    start_us: int = 0
    end_us: int = 0
    view_version: int = 0


@dataclass(frozen=True, slots=True)
class FeatureStatistics:
    name: str
    count: int = 0
    nulls: int = 0
    min: float = 0.0
    max: float = 0.0
    mean: float = 0.0
    std: float = 0.0
    quantiles: Sequence[float] = ()  # at materialize.QUANTILES (numeric features)
    distinct: int = 0


@dataclass(frozen=True, slots=True)
class Statistics:
    """Per-feature statistics of the rows one materialization of a view version wrote."""

    view_version: int
    compute_time: datetime | None
    start_us: int
    end_us: int
    features: Sequence[FeatureStatistics] = ()


# -- historical retrieval and training sets ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HistoricalQuery:
    """A point-in-time query: features (or a feature set) for the rows of an entity table given
    as an Arrow IPC stream or a Parquet file."""

    features: Sequence[str] = ()
    feature_set: str = ""
    entity_arrow: bytes = b""
    entity_uri: str = ""
    timestamp_column: str = ""  # "": event_timestamp
    filter_by_created_timestamp: bool = False


@dataclass(frozen=True, slots=True)
class TrainingSetRequest:
    """A HistoricalQuery's fields, and where and how to write its result. `request_hash`: the
    digest of everything but the request id, as the transport computes it (stored with the id;
    it must never change for a given request, services/common/fingerprint.py)."""

    output_uri: str
    request_hash: str
    features: Sequence[str] = ()
    feature_set: str = ""
    entity_arrow: bytes = b""
    entity_uri: str = ""
    timestamp_column: str = ""
    filter_by_created_timestamp: bool = False
    overwrite: bool = False
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Dataset:
    """A training set written by TrainingSets.create, with what lineage needs."""

    dataset_id: str
    uri: str
    sha256: str
    rows: int
    features: Sequence[str]  # "view:feature@v2"
    feature_set: str
    created_by: str
    create_time: datetime | None
