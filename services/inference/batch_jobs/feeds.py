"""Reading a job's input and building the model's feeds: the file (Parquet, CSV) in chunks of
chunk_rows rows, its columns mapped to the model's inputs and converted with vectorised Arrow
casts, each chunk scored in pieces the model accepts, and the outputs turned into columns.

Output layout: the input's columns unchanged, then one column per model output, named like the
output. An output with one value per row ([N] or [N, 1]) is a plain column; a wider one is a
fixed_size_list column holding the row's values (row-major, flattened when the rank is > 2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from services.common.errors import InvalidArgument
from services.inference.runtime import NUMPY_TO_V2, ModelRuntime, TensorInfo


class JobError(Exception):
    """A problem with the job's input, model or output; the job fails with this message."""


@dataclass(frozen=True)
class _Feed:
    """How one model input is built from the file's columns."""

    spec: TensorInfo
    columns: tuple[str, ...]
    matrix: bool  # True: the columns side by side are the [N, F] input; False: one column is the input


def _v2(dtype: np.dtype) -> str:
    return NUMPY_TO_V2.get(dtype, str(dtype))


def _numeric(typ: pa.DataType) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)


def _is_list(typ: pa.DataType) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _arrow_type(dtype: np.dtype) -> pa.DataType:
    return pa.string() if dtype == np.dtype(object) else pa.from_numpy_dtype(dtype)


def _check_type(typ: pa.DataType, column: str, spec: TensorInfo, text: bool) -> None:
    is_str = pa.types.is_string(typ) or pa.types.is_large_string(typ)
    # CSV (text): a column named for a numeric input is parsed as the model's type when read, and
    # a value that does not parse fails the job then, naming it.
    ok = is_str if spec.dtype == np.dtype(object) else _numeric(typ) or (text and is_str)
    if not ok:
        raise JobError(f"column '{column}' is {typ}; the model's input '{spec.name}' takes {_v2(spec.dtype)}")


def plan_feeds(schema: pa.Schema, inputs: list[TensorInfo], input_columns: Sequence[str],
               text: bool = False) -> list[_Feed]:
    """Map the file's columns to the model's inputs (the rules of BatchJob.input_columns), and
    check names, types and widths once, before any row is read. text: the file is CSV."""
    names = schema.names
    sig = ", ".join(f"'{i.name}' {_v2(i.dtype)}{list(i.shape)}" for i in inputs)
    one_matrix = len(inputs) == 1 and len(inputs[0].shape) == 2
    numeric_columns = tuple(f.name for f in schema if _numeric(f.type))
    if input_columns:
        if not one_matrix:
            raise JobError(f"input_columns needs a model with one 2-D input; the model takes {sig}")
        plan = [_Feed(inputs[0], tuple(input_columns), True)]
    elif all(i.name in names for i in inputs):
        plan = [_Feed(i, (i.name,), False) for i in inputs]
    elif one_matrix:
        if not numeric_columns:
            raise JobError(f"the input file has no numeric column to form the model's input {sig}; "
                           f"its columns are {names}")
        plan = [_Feed(inputs[0], numeric_columns, True)]
    else:
        raise JobError(f"the input file has no column for each of the model's inputs {sig}; "
                       f"its columns are {names}")
    for f in plan:
        missing = [c for c in f.columns if schema.get_field_index(c) < 0]  # -1: absent (or duplicated)
        if missing:
            raise JobError(f"the input file has no column {', '.join(map(repr, missing))}; its columns are {names}")
        spec = f.spec
        if f.matrix:
            if spec.shape[1] not in (-1, len(f.columns)):
                raise JobError(f"the model's input '{spec.name}' takes {spec.shape[1]} features per row; "
                               f"{len(f.columns)} columns were given ({', '.join(f.columns)}); name the feature "
                               "columns with input_columns")
            for c in f.columns:
                _check_type(schema.field(c).type, c, spec, text)
            continue
        c, typ = f.columns[0], schema.field(f.columns[0]).type
        if len(spec.shape) > 2:
            raise JobError(f"the model's input '{spec.name}' has shape {list(spec.shape)}; batch jobs feed inputs "
                           "of shape [N] or [N, F]")
        if _is_list(typ):
            if len(spec.shape) != 2:
                raise JobError(f"column '{c}' holds lists; the model's input '{spec.name}' takes one value per row")
            if pa.types.is_fixed_size_list(typ) and spec.shape[1] not in (-1, typ.list_size):
                raise JobError(f"column '{c}' holds lists of {typ.list_size}; the model's input '{spec.name}' "
                               f"takes {spec.shape[1]} values per row")
            _check_type(typ.value_type, c, spec, False)
        else:
            _check_type(typ, c, spec, text)
            if len(spec.shape) == 2 and spec.shape[1] not in (-1, 1):
                raise JobError(f"column '{c}' holds one value per row; the model's input '{spec.name}' takes "
                               f"{spec.shape[1]} (give a list column, or name the columns with input_columns)")
    return plan


def _values(col: pa.ChunkedArray | pa.Array, column: str, dtype: np.dtype) -> np.ndarray:
    """One column as a 1-D numpy array of the model's dtype (Arrow's cast: vectorised, and safe:
    3.5 -> int or 300 -> int8 is an error, not a silent change)."""
    if col.null_count:
        raise JobError(f"column '{column}' has {col.null_count} empty value(s); the model needs every value")
    target = _arrow_type(dtype)
    # Integer features becoming floats may round (int64 -> float32): that is the usual conversion.
    safe = not (pa.types.is_integer(col.type) and pa.types.is_floating(target))
    try:
        return pc.cast(col, target, safe=safe).to_numpy()
    except pa.ArrowInvalid as e:
        raise JobError(f"column '{column}': {e}") from None


def build_feeds(tbl: pa.Table, plan: list[_Feed]) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for f in plan:
        spec, n = f.spec, tbl.num_rows
        if f.matrix:
            m = np.empty((n, len(f.columns)), dtype=spec.dtype)
            for j, c in enumerate(f.columns):
                m[:, j] = _values(tbl.column(c), c, spec.dtype)
            feeds[spec.name] = m
            continue
        c = f.columns[0]
        col = tbl.column(c)
        if _is_list(col.type):
            if col.null_count:
                raise JobError(f"column '{c}' has {col.null_count} empty value(s); the model needs every value")
            mm = pc.min_max(pc.list_value_length(col))
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if lo != hi:
                raise JobError(f"column '{c}' holds lists of {lo} to {hi} values; the model's input "
                               f"'{spec.name}' needs the same number in every row")
            feeds[spec.name] = _values(pc.list_flatten(col), c, spec.dtype).reshape(n, lo)
        else:
            v = _values(col, c, spec.dtype)
            feeds[spec.name] = v.reshape(n, 1) if len(spec.shape) == 2 else v
    return feeds


def _rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly `rows` rows (the last may be shorter): readers cut at their own bounds
    (CSV blocks, Parquet row groups)."""
    pending: list[pa.RecordBatch] = []
    have = 0
    for b in batches:
        while b.num_rows:
            take = min(rows - have, b.num_rows)
            pending.append(b.slice(0, take))
            have, b = have + take, b.slice(take)
            if have == rows:
                yield pa.Table.from_batches(pending)
                pending, have = [], 0
    if have:
        yield pa.Table.from_batches(pending)


def is_csv(path: Path | str) -> bool:
    return str(path).lower().endswith(".csv")


def read_schema(path: Path) -> tuple[pa.Schema, int | None]:
    """The file's schema and row count (None for CSV: known only once read)."""
    if is_csv(path):
        with pacsv.open_csv(path) as r:  # infers the types from the first block
            return r.schema, None
    with pq.ParquetFile(path) as pf:
        return pf.schema_arrow, pf.metadata.num_rows


def read_chunks(path: Path, rows: int, plan: list[_Feed], names: list[str]) -> Iterator[pa.Table]:
    """The file in tables of `rows` rows. names: the file's columns (for error messages)."""
    if is_csv(path):
        # The model's columns are parsed as the model's types from the start: inference from the
        # first block alone would make "1" an int64 and then fail on a later "1.5".
        types = {c: _arrow_type(f.spec.dtype) for f in plan for c in f.columns}
        try:
            with pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(column_types=types)) as r:
                yield from _rechunk(r, rows)
        except pa.ArrowInvalid as e:  # Arrow names the column by its index only
            raise JobError(re.sub(r"CSV column #(\d+)", lambda m: f"CSV column '{names[int(m[1])]}'"
                                  if int(m[1]) < len(names) else m[0], str(e))) from None
    else:
        with pq.ParquetFile(path) as pf:
            yield from _rechunk(pf.iter_batches(batch_size=rows), rows)


def _piece_rows(rt: ModelRuntime) -> int:
    """Rows per model run: the max batch size; for a model without a dynamic batch dimension its
    fixed one (often 1); 0: the whole chunk at once."""
    if rt.max_batch_size:
        return rt.max_batch_size
    dims = {i.shape[0] for i in rt.inputs if i.shape}
    return dims.pop() if len(dims) == 1 and next(iter(dims)) > 0 else 0


def score(rt: ModelRuntime, feeds: dict[str, np.ndarray], rows: int, first_row: int) -> list[np.ndarray]:
    """Run the model over one chunk, in pieces the model accepts; one output row per input row."""
    step = _piece_rows(rt) or rows
    pieces: list[list[np.ndarray]] = []
    for i in range(0, rows, step):
        part = {k: v[i:i + step] for k, v in feeds.items()}
        where = f"rows {first_row + i}..{first_row + min(i + step, rows) - 1}"
        try:
            rt.check(part)
        except InvalidArgument as e:
            raise JobError(f"{where}: {e.message}") from None
        try:
            outs = [np.asarray(o) for o in rt.run(part)]
        except Exception as e:  # ONNX Runtime's errors describe the model's failure
            raise JobError(f"{where}: the model failed: {e}") from None
        got = min(len(part[k]) for k in part)
        for name, o in zip(rt.output_names, outs, strict=True):
            if o.ndim == 0 or o.shape[0] != got:
                raise JobError(f"the model's output '{name}' has shape {list(o.shape)} for {got} input rows; "
                               "batch jobs need one output row per input row")
        pieces.append(outs)
    return [np.concatenate(p) if len(p) > 1 else p[0] for p in zip(*pieces, strict=True)]


def output_array(arr: np.ndarray) -> pa.Array:
    width = math.prod(arr.shape[1:])
    values = pa.array(arr.reshape(-1), type=_arrow_type(arr.dtype))
    return values if width == 1 else pa.FixedSizeListArray.from_arrays(values, width)


def declared_type(info: TensorInfo) -> pa.DataType:
    """An output's column type from the signature alone (for an input without rows)."""
    base, rest = _arrow_type(info.dtype), info.shape[1:]
    if -1 in rest:
        return pa.list_(base)
    width = math.prod(rest)
    return base if width == 1 else pa.list_(base, width)
