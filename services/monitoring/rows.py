"""The stored form of a prediction, and the two ways predictions arrive (prediction log records
and Arrow batches) turned into it.

A stored row has these columns, in this order:

    prediction_id  string     "{request_id}:{row}" for prediction log records; the client's for Arrow
    endpoint       string     "" for a direct model call
    model          string
    version        int64
    time           timestamp[us, UTC]
    shadow         bool       a shadow target scored it (its result was not returned)
    error          string     "" when the model scored
    input.<name>   one column per feature (number, boolean or string)
    output.<name>  one column per output column

A tensor of shape [N] or [N, 1] is the column named as the tensor; [N, F] gives the columns
"<name>[0]" .. "<name>[F-1]" (a matrix input's features, a classifier's probabilities). The
prefixes keep a feature called "time" or "version" apart from the row's own columns.

Rows are partitioned by endpoint, model version and UTC day (`Partition`): the unit of the
artifact store layout, of the idempotency index and of the file catalog.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.common.errors import InvalidArgument, quote
from services.common.limits import MAX_VERSION
from services.common.names import check_name
from services.monitoring.types import ArrowBatch, RecordGroup

ID, ENDPOINT, MODEL, VERSION, TIME, SHADOW, ERROR = \
    "prediction_id", "endpoint", "model", "version", "time", "shadow", "error"
META = (ID, ENDPOINT, MODEL, VERSION, TIME, SHADOW, ERROR)
INPUT, OUTPUT = "input.", "output."
TIME_TYPE = pa.timestamp("us", tz="UTC")
META_TYPES = {ID: pa.string(), ENDPOINT: pa.string(), MODEL: pa.string(), VERSION: pa.int64(),
              TIME: TIME_TYPE, SHADOW: pa.bool_(), ERROR: pa.string()}
#: A prediction id is at most this long (the ground truth table's key).
MAX_ID_CHARS = 256
#: Feature and output columns of one batch, at most.
MAX_COLUMNS = 4096
US_PER_DAY = 86_400_000_000
#: Prediction times from the epoch to the year 2200 (a partition is a UTC day).
MAX_TIME_US = 7_258_118_400 * 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, order=True)
class Partition:
    """Where a row is stored: its endpoint, model version and UTC day (days since the epoch)."""

    endpoint: str
    model: str
    version: int
    day: int

    @property
    def date(self) -> str:
        return (_EPOCH + timedelta(days=self.day)).strftime("%Y-%m-%d")

    @property
    def prefix(self) -> str:
        """The artifact store folder of its files (names are model names or empty: '_')."""
        return (f"monitoring/predictions/endpoint={self.endpoint or '_'}/model={self.model}/version={self.version}"
                f"/date={self.date}")


def day_of(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(days=1)


# -- tensors to columns --------------------------------------------------------------------------

def tensor_columns(name: str, values: np.ndarray, field: str) -> list[tuple[str, np.ndarray]]:
    """The columns of a tensor of shape [rows, ...] (see the module docstring)."""
    if values.ndim == 1:
        return [(name, values)]
    if values.ndim == 2:
        if values.shape[1] == 1:
            return [(name, values[:, 0])]
        return [(f"{name}[{j}]", values[:, j]) for j in range(values.shape[1])]
    raise InvalidArgument(field, f"has shape {quote(list(values.shape))}; monitored tensors are [rows] or "
                                 "[rows, columns]")


_ELEMENT = re.compile(r"^(.*)\[(\d+)\]\Z")


class ModelColumns:
    """The columns of a model's tensors as its registry signature declares them: exact names, and
    for a tensor whose second dimension is dynamic, any "<name>[j]"."""

    def __init__(self, tensors: Sequence[tuple[str, Sequence[int]]]) -> None:
        self.names: list[str] = []
        self.open: set[str] = set()  # tensors with a dynamic second dimension
        for name, shape in tensors:
            tail = list(shape[1:])
            if len(tail) == 0 or tail == [1]:
                self.names.append(name)
            elif len(tail) == 1 and tail[0] > 1:
                self.names += [f"{name}[{j}]" for j in range(tail[0])]
            elif len(tail) == 1:
                self.open.add(name)
            # rank > 2: not monitored (refused at ingestion too)

    def __contains__(self, column: str) -> bool:
        if column in self.names:
            return True
        m = _ELEMENT.match(column)
        return m is not None and m.group(1) in self.open

    def describe(self) -> str:
        shown = self.names[:20] + [f"{n}[*]" for n in sorted(self.open)]
        return ", ".join(quote(c) for c in shown) + (" ..." if len(self.names) > 20 else "") or "none"


def column_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A stored or reference column as the drift functions take it: numbers as numpy numbers
    (nulls as NaN), strings as a str array (with nulls: objects, None for a null), booleans as the
    strings "true" and "false" (categories on both sides, whichever side they come from)."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_boolean(t):
        col, t = col.cast(pa.string()), pa.string()
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return col.to_numpy(zero_copy_only=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        values = col.to_numpy(zero_copy_only=False)
        return values if col.null_count else values.astype(str)
    raise InvalidArgument("columns", f"a {t} column cannot be profiled (numbers, booleans and strings can)")


def in_message(e: InvalidArgument, index: int) -> InvalidArgument:
    """`e` saying which message of an ingestion stream it is about (counted from 0)."""
    problem = e.message.removeprefix(f"{e.field}: ")
    return InvalidArgument(e.field or "records", f"{problem} (message {index} of the stream)")


# -- records -------------------------------------------------------------------------------------

def records_table(g: RecordGroup, field: str = "records") -> pa.Table:
    """The stored rows of a group of prediction log records (ids "{request_id}:{row}")."""
    at = g.positions[0]
    _check_names(g.endpoint, g.model, g.version, f"{field}[{at}]")
    for rid, pos in zip(g.request_ids, g.positions, strict=True):
        if not rid:
            raise InvalidArgument(f"{field}[{pos}].request_id", "is required: it makes the prediction ids")
        if len(rid) > MAX_ID_CHARS - 12:
            raise InvalidArgument(f"{field}[{pos}].request_id", f"is {len(rid)} characters; at most "
                                                                f"{MAX_ID_CHARS - 12}")
    if int(g.times_us.min(initial=0)) < 0 or int(g.times_us.max(initial=0)) >= MAX_TIME_US:
        bad = int(np.flatnonzero((g.times_us < 0) | (g.times_us >= MAX_TIME_US))[0])
        raise InvalidArgument(f"{field}[{g.positions[bad]}].time", "must lie between 1970 and 2200")
    n = int(g.rows.sum())
    if n == len(g.request_ids):  # single-row records, as most are: one id each, "{request_id}:0"
        ids = [rid + ":0" for rid in g.request_ids]
    else:
        ids = [f"{rid}:{j}" for rid, k in zip(g.request_ids, g.rows.tolist(), strict=True) for j in range(k)]
    errors = pa.repeat("", n) if not any(g.errors) else pa.array(np.repeat(np.array(g.errors, dtype=object), g.rows),
                                                                 pa.string())
    columns: dict[str, pa.Array] = {
        ID: pa.array(ids, pa.string()), ENDPOINT: pa.repeat(g.endpoint, n), MODEL: pa.repeat(g.model, n),
        VERSION: pa.repeat(g.version, n), TIME: pa.array(np.repeat(g.times_us, g.rows), TIME_TYPE),
        SHADOW: pa.repeat(g.shadow, n), ERROR: errors}
    for prefix, tensors, kind in ((INPUT, g.inputs, "inputs"), (OUTPUT, g.outputs, "outputs")):
        for j, (name, values) in enumerate(tensors):
            where = f"{field}[{at}].{kind}[{j}]"
            for column, col in tensor_columns(name, values, where):
                if prefix + column in columns:
                    raise InvalidArgument(where, f"column {quote(column)} appears twice")
                columns[prefix + column] = _value_array(col, where)
    _check_width(len(columns) - len(META), field)
    return pa.table(columns)


def _value_array(values: np.ndarray, field: str) -> pa.Array:
    if values.dtype.kind in "iub":
        return pa.array(values)
    if values.dtype.kind == "f":
        return pa.array(values.astype(np.float32) if values.dtype.itemsize < 4 else values)
    if values.dtype.kind in "OU":
        try:
            return pa.array(values.tolist(), pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise InvalidArgument(field, "holds values that are neither numbers, booleans nor strings") from None
    raise InvalidArgument(field, f"has dtype {values.dtype}; monitored values are numbers, booleans or strings")


# -- Arrow batches -------------------------------------------------------------------------------

def arrow_table(batch: ArrowBatch, field: str = "arrow_ipc") -> pa.Table:
    """The stored rows of a bulk client's Arrow batch (see IngestPredictionsRequest.arrow_ipc)."""
    try:
        with pa.ipc.open_stream(batch.data) as reader:
            table = reader.read_all()
    except (pa.ArrowException, OSError) as e:
        raise InvalidArgument(field, f"is not an Arrow IPC stream: {quote(str(e), 200)}") from None
    names = table.column_names
    if len(set(names)) != len(names):
        raise InvalidArgument(field, "has a column name twice")
    outputs = list(batch.output_columns)
    for i, name in enumerate(outputs):
        if name not in names or name in META:
            raise InvalidArgument(f"output_columns[{i}]", f"{quote(name)} is not a feature or output column "
                                                          f"of {field}")
    for name in (ID, MODEL, VERSION, TIME):
        if name not in names:
            raise InvalidArgument(f"{field}[{quote(name)}]", "is missing")
    if ERROR in names:
        raise InvalidArgument(f"{field}[{quote(ERROR)}]", "is set by prediction log records only")
    n = table.num_rows
    columns: dict[str, pa.Array] = {}
    for name, kind in ((ID, "string"), (ENDPOINT, "string"), (MODEL, "string")):
        col = table.column(name) if name in names else pa.repeat("", n)
        columns[name] = _cast(col, pa.string(), f"{field}[{quote(name)}]", kind)
    columns[VERSION] = _cast(table.column(VERSION), pa.int64(), f"{field}[{quote(VERSION)}]", "integer")
    time = table.column(TIME)
    if not pa.types.is_timestamp(time.type):
        raise InvalidArgument(f"{field}[{quote(TIME)}]", f"must be a timestamp; got {time.type}")
    columns[TIME] = time.cast(pa.timestamp("us", tz=time.type.tz)).cast(TIME_TYPE)
    columns[SHADOW] = (_cast(table.column(SHADOW), pa.bool_(), f"{field}[{quote(SHADOW)}]", "boolean")
                       if SHADOW in names else pa.repeat(False, n))
    columns[ERROR] = pa.repeat("", n)
    for name in META[:-1]:
        if columns[name].null_count:
            raise InvalidArgument(f"{field}[{quote(name)}]", "has null values")
    values = [c for c in names if c not in META]
    _check_width(len(values), field)
    out = set(outputs)
    for name in values:
        where = f"{field}[{quote(name)}]"
        columns[(OUTPUT if name in out else INPUT) + name] = _feature_column(table.column(name), where)
    table = pa.table(columns)
    _check_arrow_values(table, field)
    return table.combine_chunks()


def _cast(col: pa.ChunkedArray | pa.Array, to: pa.DataType, field: str, kind: str) -> pa.ChunkedArray | pa.Array:
    t = col.type
    ok = (kind == "string" and (pa.types.is_string(t) or pa.types.is_large_string(t)
                                or (pa.types.is_dictionary(t) and pa.types.is_string(t.value_type)))
          or kind == "integer" and pa.types.is_integer(t) or kind == "boolean" and pa.types.is_boolean(t))
    if not ok:
        raise InvalidArgument(field, f"must be {kind}; got {t}")
    return col.cast(to)


def _feature_column(col: pa.ChunkedArray, field: str) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_dictionary(t):
        t = t.value_type
        col = col.cast(t)
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_float32(t) or pa.types.is_float64(t):
        return col
    if pa.types.is_float16(t):
        return col.cast(pa.float32())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return col.cast(pa.string())
    raise InvalidArgument(field, f"is {t}; feature and output columns hold numbers, booleans or strings")


def _check_arrow_values(table: pa.Table, field: str) -> None:
    ids = table.column(ID)
    lengths = pc.min_max(pc.utf8_length(ids))
    if table.num_rows and (lengths["min"].as_py() < 1 or lengths["max"].as_py() > MAX_ID_CHARS):
        raise InvalidArgument(f"{field}[{quote(ID)}]", f"ids are 1 to {MAX_ID_CHARS} characters")
    versions = pc.min_max(table.column(VERSION))
    if table.num_rows and (versions["min"].as_py() < 1 or versions["max"].as_py() > MAX_VERSION):
        raise InvalidArgument(f"{field}[{quote(VERSION)}]", f"versions are within 1..{MAX_VERSION}")
    times = pc.min_max(table.column(TIME).cast(pa.int64()))
    if table.num_rows and (times["min"].as_py() < 0 or times["max"].as_py() >= MAX_TIME_US):
        raise InvalidArgument(f"{field}[{quote(TIME)}]", "times lie between 1970 and 2200")
    for endpoint in pc.unique(table.column(ENDPOINT)).to_pylist():
        if endpoint:
            check_name(endpoint, f"{field}[{quote(ENDPOINT)}]")
    for model in pc.unique(table.column(MODEL)).to_pylist():
        check_name(model, f"{field}[{quote(MODEL)}]")


def _check_names(endpoint: str, model: str, version: int, field: str) -> None:
    if endpoint:
        check_name(endpoint, f"{field}.endpoint")
    check_name(model, f"{field}.model")
    if not 0 < version <= MAX_VERSION:
        raise InvalidArgument(f"{field}.version", f"must be within 1..{MAX_VERSION}; got {version}")


def _check_width(n: int, field: str) -> None:
    if n > MAX_COLUMNS:
        raise InvalidArgument(field, f"has {n} feature and output columns; at most {MAX_COLUMNS}")


# -- partitions ----------------------------------------------------------------------------------

def partitions(table: pa.Table) -> list[tuple[Partition, pa.Table]]:
    """The rows of `table` by partition, in row order within each."""
    days = pc.divide(table.column(TIME).cast(pa.int64()), US_PER_DAY)  # (times are >= 0: floor)
    keys = (table.column(ENDPOINT), table.column(MODEL), table.column(VERSION), days)
    if all(pc.count_distinct(k).as_py() == 1 for k in keys):  # the usual case: one partition
        first = tuple(k[0].as_py() for k in keys)
        return [(Partition(*first), table)]
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(*(k.to_pylist() for k in keys), strict=True)):
        groups.setdefault(key, []).append(i)
    return [(Partition(*key), table.take(pa.array(rows))) for key, rows in sorted(groups.items())]
