"""Data quality of a window's rows against a model version's reference profile: per profiled
feature and output, missing values beside the reference's share, numbers outside the reference's
range, values of another kind than the reference's, and categories the reference never had; and
which reference columns the window lacks and which window columns the reference does not profile.
No protobuf: the servicer converts.

What each count means:
- Missing (`null_rows`): null, NaN or +-inf, as the drift report drops them. Every other count is
  of the non-missing values.
- Out of range: a numeric reference keeps every sorted value, so its minimum and maximum are known;
  a value below the minimum or above the maximum is out of range, one equal to either is not.
- Type mismatch: the store keeps one Arrow type per column per model version (a batch of another
  type is refused at ingestion), so a value's kind cannot differ from its neighbours' within a
  version: what can differ is the column's kind against the reference's. Numbers (integers,
  floats) against a numeric reference (or a categorical one of numbers) match; text (strings, and
  booleans, which the profile keeps as the categories "true"/"false") against a categorical
  reference of strings matches; anything else is a mismatch of every non-missing value of the
  column, and such values are neither range-checked nor looked up among the categories.
- Unseen: a value of a categorical reference's kind that is none of its categories; the count of
  rows, of distinct values, and the ten most frequent (ties by value).

Column-wise Arrow compute (casts, `is_in`, `value_counts`), no per-row Python.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.monitoring.drift import CategoricalReference, ColumnReference, NumericReference
from services.monitoring.references import Profiles
from services.monitoring.rows import INPUT, OUTPUT
from services.monitoring.types import ColumnQuality, Role, VersionQuality

#: Unseen categories named per column, at most.
UNSEEN_EXAMPLES = 10

_NUMBER, _TEXT = "number", "text"


def present_columns(rows: pa.Table, prefix: str) -> list[str]:
    """The `prefix` columns with a value in some row (a scan's schema is every version's, so a
    column only another version has is all null here)."""
    return [n for n in rows.column_names if n.startswith(prefix) and rows.column(n).null_count < rows.num_rows]


def version_quality(model: str, version: int, shadow: bool, rows: pa.Table, profiles: Profiles) -> VersionQuality:
    """The quality of one model version's rows (stored rows: `input.*` and `output.*` columns)."""
    out: dict[Role, list[ColumnQuality]] = {Role.FEATURE: [], Role.PREDICTION: []}
    missing: list[str] = []
    extra: list[str] = []
    for prefix, profile, role in ((INPUT, profiles.features, Role.FEATURE),
                                  (OUTPUT, profiles.predictions, Role.PREDICTION)):
        present = [n[len(prefix):] for n in present_columns(rows, prefix)]
        profiled = profile.columns if profile is not None else {}
        have = set(present)
        for name, ref in profiled.items():
            if name in have:
                out[role].append(column_quality(name, role, ref, rows.column(prefix + name)))
            else:
                missing.append(name)
        extra += [n for n in present if n not in profiled]
    return VersionQuality(model, version, shadow, rows.num_rows, tuple(out[Role.FEATURE]),
                          tuple(out[Role.PREDICTION]), tuple(missing), tuple(extra))


def column_quality(name: str, role: Role, ref: ColumnReference,
                   column: pa.Array | pa.ChunkedArray) -> ColumnQuality:
    """One column of a window against its reference column."""
    stored = column.type
    if pa.types.is_dictionary(stored):
        column, stored = column.cast(stored.value_type), stored.value_type
    rows = len(column)
    kind = _NUMBER if pa.types.is_integer(stored) or pa.types.is_floating(stored) else _TEXT
    if kind == _NUMBER:
        # (safe=False: an int64 beyond 2**53 rounds, as the drift report's float64 does)
        x = column.cast(pa.float64(), safe=False)
        values = x.filter(pc.fill_null(pc.is_finite(x), False))
    else:
        if not (pa.types.is_string(stored) or pa.types.is_large_string(stored)):
            column = column.cast(pa.string())  # booleans as "true"/"false", the profile's categories
        values = column.drop_null()
    n = len(values)
    want = _NUMBER if isinstance(ref, NumericReference) or ref.categories.dtype.kind != "U" else _TEXT
    lo = hi = None
    out_of_range = mismatches = unseen_rows = unseen_distinct = 0
    examples: tuple[str, ...] = ()
    if isinstance(ref, NumericReference):
        lo, hi = float(ref.values[0]), float(ref.values[-1])
    if kind != want:
        mismatches = n
    elif isinstance(ref, NumericReference):
        outside = pc.or_(pc.less(values, lo), pc.greater(values, hi))
        out_of_range = int(pc.sum(outside).as_py() or 0)
    else:
        unseen_rows, unseen_distinct, examples = _unseen(ref, values)
    return ColumnQuality(name, role, ref.kind, str(stored), rows, rows - n, ref.null_share, out_of_range, lo, hi,
                         mismatches, unseen_rows, unseen_distinct, examples)


def _unseen(ref: CategoricalReference, values: pa.Array | pa.ChunkedArray) -> tuple[int, int, tuple[str, ...]]:
    """Rows whose value is no category of the reference, their distinct values, and the most
    frequent of those (ties by value)."""
    categories = pa.array(ref.categories, pa.string() if ref.categories.dtype.kind == "U" else pa.float64())
    unseen = values.filter(pc.invert(pc.is_in(values, value_set=categories)))
    if len(unseen) == 0:
        return 0, 0, ()
    counts = pc.value_counts(unseen)
    table = pa.table({"value": counts.field("values"), "count": counts.field("counts")})
    top = table.sort_by([("count", "descending"), ("value", "ascending")]).slice(0, UNSEEN_EXAMPLES)
    examples = top.column("value").to_pylist()
    if pa.types.is_floating(categories.type):
        examples = [np.format_float_positional(v, trim="-") for v in examples]
    return len(unseen), len(counts), tuple(examples)
