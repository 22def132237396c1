"""Data drift per feature between a reference profile and a current window, with Evidently's
defaults (evidently 0.7, `legacy/calculations/stattests`): the same choice of test by column kind,
reference size and number of distinct values, the same formulas, thresholds and comparison
operators, so a Strata report and an Evidently report on the same data agree. No protobuf: the
servicer converts.

What the reference needs is computed once (`ReferenceProfile.from_columns`): for a numeric column
its finite values sorted, their standard deviation and distinct count; for a categorical column its
sorted categories and their counts. A window then costs one sort of each current numeric column
(O(n log n)) and a linear merge with the sorted reference, or one binary search per categorical value
among the reference's categories: numpy work, no per-row Python.

The rules, as Evidently applies them:
- Missing values are dropped before any test: NaN, None and, as Evidently replaces them by NaN
  first, +-inf. Each result reports the share it dropped from the window (`null_share`) and from the
  reference. A column with no value left is refused (InvalidArgument naming it), never scored NaN.
- `choose_method`: the size rule looks at the reference's rows (after dropping missing values),
  1000 or fewer being "small"; `n_unique` counts distinct values over reference and window together.
- Scores: p-values for `ks` (drift when p <= threshold), `chisquare` and `z` (p < threshold);
  distances for `wasserstein`, `jensenshannon` and `psi` (drift when score >= threshold). Default
  thresholds 0.05 for p-values, 0.1 for distances. PSI is reported beside every column's method.
- Bins for Jensen-Shannon and PSI: a numeric column with more than 20 distinct reference values is
  cut by Sturges' rule over reference and window together (`np.histogram_bin_edges(concat, "sturges")`;
  Evidently's `n_bins=30` is ignored there too); otherwise one bin per distinct value of either side.
  PSI replaces empty bins by 0.0001 (or the smallest non-empty share / 1e6 when that is <= 0.0001);
  Jensen-Shannon keeps them empty.
- `wasserstein` is `scipy.stats.wasserstein_distance(ref, cur) / max(std(ref), 0.001)` with numpy's
  population std (ddof=0): Evidently calls `np.std` on a pandas Series, which forwards numpy's
  ddof=0, not pandas' default ddof=1. The distance is computed here from the sorted sides with
  scipy's own CDF-difference integral, so the sorted reference is reused across windows; its terms
  are summed without BLAS (equal to scipy's to rounding, see `wasserstein_norm`).
- Overrides name a method Evidently registers for the column's kind: `ks` and `wasserstein` for
  numeric columns, `chisquare` and `z` for categorical ones, `jensenshannon` and `psi` for both (the
  default table still picks chi-square or Z for a small numeric column with at most 5 values).
- Dataset drift: the share of drifted features >= `drift_share` (0.5).

Where this differs from Evidently, on purpose: a chi-square test over a single value (a constant
column, same constant in the window) scores p = 1.0 with statistic 0 where scipy gives NaN
(evidently#1929); a window category the reference never had scores chi-square p = 0.0 (statistic
inf), as scipy does, without the division warning. Numeric values are compared as float64 (numpy's
integer-only Sturges width floor of 1 does not apply).

Categorical values: numpy str arrays (fastest), object arrays (None and NaN are missing; other
objects are compared by their `str()`, which also decides the Z-test's first category), or numbers
and booleans (compared as float64, NaN missing). Reference and window must hold the same sort.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import numpy as np
from scipy import stats
from scipy.spatial import distance

from services.common.errors import InvalidArgument, quote

#: Evidently's size switch: a reference of at most this many rows gets the statistical tests.
SMALL_REFERENCE_ROWS = 1000
#: Above this many distinct reference values a numeric column is binned by Sturges' rule.
MAX_VALUE_BINS = 20


class ColumnKind(enum.StrEnum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


class Method(enum.StrEnum):
    """Evidently's names for its tests."""

    KS = "ks"
    CHISQUARE = "chisquare"
    Z = "z"
    WASSERSTEIN = "wasserstein"
    JENSENSHANNON = "jensenshannon"
    PSI = "psi"

    @property
    def is_p_value(self) -> bool:
        return self in (Method.KS, Method.CHISQUARE, Method.Z)

    @property
    def default_threshold(self) -> float:
        return 0.05 if self.is_p_value else 0.1

    def drifted(self, score: float, threshold: float) -> bool:
        # Evidently's operators, equality included: ks `<=`, chisquare and z `<`, distances `>=`.
        if self is Method.KS:
            return score <= threshold
        if self.is_p_value:
            return score < threshold
        return score >= threshold


#: What an override may pick per kind (Evidently's `allowed_feature_types`).
OVERRIDE_METHODS = {
    ColumnKind.NUMERIC: (Method.KS, Method.WASSERSTEIN, Method.JENSENSHANNON, Method.PSI),
    ColumnKind.CATEGORICAL: (Method.CHISQUARE, Method.Z, Method.JENSENSHANNON, Method.PSI),
}


def choose_method(kind: ColumnKind, reference_rows: int, n_unique: int) -> Method:
    """Evidently's default test (`registry._get_default_stattest`): `reference_rows` are the
    reference's non-missing rows, `n_unique` the distinct values of reference and window together."""
    if reference_rows < 1:
        raise InvalidArgument("reference_rows", f"must be at least 1; got {reference_rows}")
    if n_unique < 1:
        raise InvalidArgument("n_unique", f"must be at least 1; got {n_unique}")
    small = reference_rows <= SMALL_REFERENCE_ROWS
    if kind is ColumnKind.NUMERIC and n_unique > 5:
        return Method.KS if small else Method.WASSERSTEIN
    if not small:
        return Method.JENSENSHANNON
    return Method.CHISQUARE if n_unique > 2 else Method.Z


# --- the reference profile ----------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class NumericReference:
    values: np.ndarray        # finite reference values, ascending, read-only
    std: float                # np.std (ddof=0) in the original row order, as Evidently computes it
    n_distinct: int
    null_share: float
    kind: ClassVar[ColumnKind] = ColumnKind.NUMERIC

    @property
    def n(self) -> int:
        return self.values.size


@dataclass(frozen=True, eq=False)
class CategoricalReference:
    categories: np.ndarray    # distinct values, ascending: str ('U') or float64; read-only
    counts: np.ndarray        # reference rows per category (int64), read-only
    null_share: float
    kind: ClassVar[ColumnKind] = ColumnKind.CATEGORICAL

    @property
    def n(self) -> int:
        return int(self.counts.sum())


ColumnReference = NumericReference | CategoricalReference


@dataclass(frozen=True, eq=False)
class ReferenceProfile:
    """Everything a drift report needs from the reference, per column, in the reference's order."""

    columns: Mapping[str, ColumnReference]

    @classmethod
    def from_columns(cls, columns: Mapping[str, object],
                     kinds: Mapping[str, ColumnKind | str] | None = None) -> ReferenceProfile:
        """Profile equal-length 1-D columns (numpy arrays or sequences). A column's kind is taken from
        `kinds`, else from its dtype: integers and floats are numeric; booleans, strings and objects
        categorical."""
        if not columns:
            raise InvalidArgument("reference", "has no columns")
        kinds = dict(kinds or {})
        for name in kinds:
            if name not in columns:
                raise InvalidArgument(f"kinds[{quote(name)}]", "is not a reference column")
        arrays = {name: np.asarray(col) for name, col in columns.items()}
        rows = _common_length("reference", arrays)
        if rows == 0:
            raise InvalidArgument("reference", "has no rows")
        out: dict[str, ColumnReference] = {}
        for name, x in arrays.items():
            field = f"reference[{quote(name)}]"
            try:
                kind = ColumnKind(kinds[name]) if name in kinds else _inferred_kind(x)
            except ValueError:
                raise InvalidArgument(f"kinds[{quote(name)}]",
                                      f"is not one of {', '.join(ColumnKind)}") from None
            if kind is ColumnKind.NUMERIC:
                values = _numeric_values(field, x)
                _require_values(field, values, rows)
                std = float(np.std(values))  # before sorting: the order Evidently sums in
                values = np.sort(values)
                n_distinct = 1 + int(np.count_nonzero(values[1:] != values[:-1]))
                out[name] = NumericReference(_frozen(values), std, n_distinct,
                                             (rows - values.size) / rows)
            else:
                values = _categorical_values(field, x)
                _require_values(field, values, rows)
                categories, counts = np.unique(values, return_counts=True)
                out[name] = CategoricalReference(_frozen(categories), _frozen(counts.astype(np.int64)),
                                                 (rows - values.size) / rows)
        return cls(MappingProxyType(out))


# --- the report ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Override:
    """A feature's own method and/or threshold (None: the default)."""

    method: Method | str | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    kind: ColumnKind
    method: Method
    score: float              # the value compared with the threshold: a p-value or a distance
    statistic: float          # KS D, chi-square, Z; the distance itself for distances
    threshold: float
    drifted: bool
    psi: float                # PSI over the same bins, whatever the method
    n_reference: int          # non-missing rows compared
    n_current: int
    n_unique: int             # distinct values of reference and window together
    null_share: float         # share of the window's rows dropped as missing
    reference_null_share: float


@dataclass(frozen=True)
class DatasetDrift:
    features: tuple[FeatureDrift, ...]
    n_drifted: int
    share_drifted: float
    drift_share: float
    dataset_drifted: bool     # share_drifted >= drift_share


def drift_report(profile: ReferenceProfile, current_columns: Mapping[str, object],
                 overrides: Mapping[str, Override] | None = None, drift_share: float = 0.5) -> DatasetDrift:
    """Drift of each profiled feature in the window `current_columns` (equal-length 1-D columns, one
    per profile column, no other)."""
    if not 0 < drift_share <= 1:
        raise InvalidArgument("drift_share", f"must be in (0, 1]; got {drift_share}")
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in profile.columns:
            raise InvalidArgument(f"overrides[{quote(name)}]", "is not a column of the reference profile")
    for name in profile.columns:
        if name not in current_columns:
            raise InvalidArgument(f"window[{quote(name)}]", "is missing; the reference profile has it")
    for name in current_columns:
        if name not in profile.columns:
            raise InvalidArgument(f"window[{quote(name)}]", "is not a column of the reference profile")
    arrays = {name: np.asarray(current_columns[name]) for name in profile.columns}
    rows = _common_length("window", arrays)
    if rows == 0:
        raise InvalidArgument("window", "has no rows")

    features = []
    for name, ref in profile.columns.items():
        field = f"window[{quote(name)}]"
        override = overrides.get(name, Override())
        if isinstance(ref, NumericReference):
            cur = _numeric_values(field, arrays[name])
            _require_values(field, cur, rows)
            features.append(_numeric_drift(name, ref, np.sort(cur), override, rows))
        else:
            cur = _categorical_values(field, arrays[name])
            _require_values(field, cur, rows)
            if (cur.dtype.kind == "U") != (ref.categories.dtype.kind == "U"):
                have, want = ("strings", "numbers") if cur.dtype.kind == "U" else ("numbers", "strings")
                raise InvalidArgument(field, f"holds {have}; the reference holds {want}")
            features.append(_categorical_drift(name, ref, cur, override, rows))
    n_drifted = sum(f.drifted for f in features)
    share = n_drifted / len(features)
    return DatasetDrift(tuple(features), n_drifted, share, drift_share, share >= drift_share)


def _numeric_drift(name: str, ref: NumericReference, cur: np.ndarray, override: Override,
                   rows: int) -> FeatureDrift:
    merged = SortedMerge.of(ref.values, cur)
    method, threshold = _resolve(name, ColumnKind.NUMERIC, override, ref.n, merged.n_unique)
    if ref.n_distinct > MAX_VALUE_BINS:
        edges = sturges_edges(min(ref.values[0], cur[0]), max(ref.values[-1], cur[-1]), ref.n + cur.size)
        ref_shares, cur_shares = histogram(ref.values, edges) / ref.n, histogram(cur, edges) / cur.size
    else:
        ref_counts, cur_counts = merged.value_counts()
        ref_shares, cur_shares = ref_counts / ref.n, cur_counts / cur.size
    if method is Method.KS:
        statistic, score = ks(ref.values, cur)
    elif method is Method.WASSERSTEIN:
        statistic = score = wasserstein_norm(merged, ref.std)
    elif method in (Method.CHISQUARE, Method.Z):
        # Only ever the default, for at most 5 values: the counts above are per value.
        test = chisquare if method is Method.CHISQUARE else z_test
        statistic, score = test(ref_counts, cur_counts)
    else:
        statistic = score = _distance(method, ref_shares, cur_shares)
    return _feature(name, ColumnKind.NUMERIC, method, statistic, score, threshold,
                    psi(ref_shares, cur_shares), ref, cur.size, merged.n_unique, rows)


def _categorical_drift(name: str, ref: CategoricalReference, cur: np.ndarray, override: Override,
                       rows: int) -> FeatureDrift:
    ref_counts, cur_counts = category_counts(ref.categories, ref.counts, cur)
    n_unique = ref_counts.size
    method, threshold = _resolve(name, ColumnKind.CATEGORICAL, override, ref.n, n_unique)
    ref_shares, cur_shares = ref_counts / ref.n, cur_counts / cur.size
    if method is Method.CHISQUARE:
        statistic, score = chisquare(ref_counts, cur_counts)
    elif method is Method.Z:
        statistic, score = z_test(ref_counts, cur_counts)
    else:
        statistic = score = _distance(method, ref_shares, cur_shares)
    return _feature(name, ColumnKind.CATEGORICAL, method, statistic, score, threshold,
                    psi(ref_shares, cur_shares), ref, cur.size, n_unique, rows)


def _resolve(name: str, kind: ColumnKind, override: Override, reference_rows: int,
             n_unique: int) -> tuple[Method, float]:
    field = f"overrides[{quote(name)}]"
    if override.method is None:
        method = choose_method(kind, reference_rows, n_unique)
    else:
        try:
            method = Method(override.method)
        except ValueError:
            raise InvalidArgument(f"{field}.method", f"{quote(str(override.method), 40)} is not one of "
                                                     f"{', '.join(Method)}") from None
        if method not in OVERRIDE_METHODS[kind]:
            raise InvalidArgument(f"{field}.method", f"{method} does not apply to a {kind} column "
                                                     f"(use {', '.join(OVERRIDE_METHODS[kind])})")
    if override.threshold is None:
        return method, method.default_threshold
    threshold = float(override.threshold)
    if not (np.isfinite(threshold) and threshold >= 0 and (threshold <= 1 or not method.is_p_value)):
        bound = "in [0, 1] for a p-value" if method.is_p_value else "finite and >= 0"
        raise InvalidArgument(f"{field}.threshold", f"must be {bound}; got {override.threshold}")
    return method, threshold


def _feature(name: str, kind: ColumnKind, method: Method, statistic: float, score: float,
             threshold: float, psi_value: float, ref: ColumnReference, n_current: int, n_unique: int,
             rows: int) -> FeatureDrift:
    return FeatureDrift(name, kind, method, float(score), float(statistic), threshold,
                        method.drifted(score, threshold), float(psi_value), ref.n, n_current,
                        int(n_unique), (rows - n_current) / rows, ref.null_share)


def _distance(method: Method, ref_shares: np.ndarray, cur_shares: np.ndarray) -> float:
    measure = jensenshannon if method is Method.JENSENSHANNON else psi
    return measure(ref_shares, cur_shares)


# --- the methods, vectorised --------------------------------------------------------------------

class SortedMerge:
    """Reference and window values merged in ascending order, kept as the gaps between neighbours
    and the count of reference values at or before each position: the joint CDFs that Wasserstein
    and the per-value bins read."""

    __slots__ = ("deltas", "ref_cum", "n_ref", "n_cur")

    def __init__(self, deltas: np.ndarray, ref_cum: np.ndarray, n_ref: int) -> None:
        self.deltas = deltas
        self.ref_cum = ref_cum
        self.n_ref = n_ref
        self.n_cur = ref_cum.size - n_ref

    @classmethod
    def of(cls, ref_sorted: np.ndarray, cur_sorted: np.ndarray) -> SortedMerge:
        # numpy's stable sort is a timsort: on two sorted runs it is one merge, O(n).
        both = np.concatenate((ref_sorted, cur_sorted))
        order = np.argsort(both, kind="stable")
        cum_type = np.int32 if both.size < 2**31 else np.int64  # (a third of int64's cumsum time)
        ref_cum = np.cumsum(order < ref_sorted.size, dtype=cum_type)
        return cls(np.diff(both[order]), ref_cum, ref_sorted.size)

    @property
    def n_unique(self) -> int:
        return 1 + int(np.count_nonzero(self.deltas))

    def value_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Reference and window rows per distinct value, values ascending."""
        ends = np.append(np.flatnonzero(self.deltas), self.ref_cum.size - 1)
        ref_cum = self.ref_cum[ends]
        return np.diff(ref_cum, prepend=0), np.diff(ends + 1 - ref_cum, prepend=0)


def ks(ref_sorted: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov (statistic, p-value): scipy's `ks_2samp` with its defaults,
    called as is so that its choice between the exact and asymptotic p-value is scipy's own."""
    result = stats.ks_2samp(ref_sorted, cur)
    return float(result.statistic), float(result.pvalue)


def wasserstein_norm(merged: SortedMerge, ref_std: float) -> float:
    """`scipy.stats.wasserstein_distance(ref, cur) / max(ref_std, 0.001)`: scipy's integral of
    |F_ref - F_cur| over the merged values, term for term (the count at a tie's last position is
    the `right` searchsorted count scipy uses; elsewhere the gap to the next value is 0). The terms
    are summed by numpy's pairwise sum, not scipy's BLAS dot: the same to rounding, and no OpenBLAS
    threads spinning on the other cores."""
    ref_cum = merged.ref_cum[:-1]
    # In place, as float64: whole counts below 2**53 subtract exactly, so each CDF is the same
    # double as scipy's integer count / size.
    cur_cdf = np.arange(1.0, merged.ref_cum.size)
    cur_cdf -= ref_cum
    cur_cdf /= merged.n_cur
    gap = ref_cum / merged.n_ref
    gap -= cur_cdf
    np.abs(gap, out=gap)
    gap *= merged.deltas
    return float(gap.sum()) / max(ref_std, 0.001)


def chisquare(ref_counts: np.ndarray, cur_counts: np.ndarray) -> tuple[float, float]:
    """Evidently's chi-square: observed window counts against the reference counts scaled to the
    window's size, `scipy.stats.chisquare`. (statistic, p-value)."""
    if ref_counts.size == 1:
        return 0.0, 1.0  # one value on both sides: nothing moved (scipy: NaN p, 0 degrees of freedom)
    expected = ref_counts * (cur_counts.sum() / ref_counts.sum())
    with np.errstate(divide="ignore"):  # a value the reference never had: statistic inf, p 0
        result = stats.chisquare(cur_counts, expected)
    return float(result.statistic), float(result.pvalue)


def z_test(ref_counts: np.ndarray, cur_counts: np.ndarray) -> tuple[float, float]:
    """Evidently's two-proportion Z-test (`z_stattest.py`): the share of rows that are not the
    smallest value (counts index 0), pooled standard error, two-sided p = 2 (1 - Phi(|z|)).
    (z, p-value); one value on both sides is no drift, p = 1."""
    if ref_counts.size == 1:
        return 0.0, 1.0
    n1, n2 = int(ref_counts.sum()), int(cur_counts.sum())
    p1 = float(n1 - ref_counts[0]) / n1
    p2 = float(n2 - cur_counts[0]) / n2
    pooled = float(p1 * n1 + p2 * n2) / (n1 + n2)
    z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2))
    return float(z), float(2 * (1 - stats.norm.cdf(np.abs(z))))


def jensenshannon(ref_shares: np.ndarray, cur_shares: np.ndarray) -> float:
    """scipy's Jensen-Shannon distance, natural log (range [0, sqrt(ln 2)]), empty bins kept."""
    return float(distance.jensenshannon(ref_shares, cur_shares))


def psi(ref_shares: np.ndarray, cur_shares: np.ndarray) -> float:
    """Population stability index: sum((ref - cur) ln(ref / cur)) with empty bins filled."""
    ref, cur = _fill_empty(ref_shares), _fill_empty(cur_shares)
    return float(np.sum((ref - cur) * np.log(ref / cur)))


def _fill_empty(shares: np.ndarray) -> np.ndarray:
    smallest = shares[shares != 0].min()
    return np.where(shares == 0, smallest / 10**6 if smallest <= 0.0001 else 0.0001, shares)


def sturges_edges(low: float, high: float, size: int) -> np.ndarray:
    """`np.histogram_bin_edges(a, bins="sturges")` for float data of `size` values spanning
    [low, high] (low < high), without the data: numpy's width, count and linspace."""
    width = (high - low) / (np.log2(size) + 1.0)
    return np.linspace(low, high, int(np.ceil((high - low) / width)) + 1)


def histogram(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """`np.histogram(values, edges)[0]` for sorted values: half-open bins, the last one closed."""
    cum = np.concatenate((sorted_values.searchsorted(edges[:-1], "left"),
                          sorted_values.searchsorted(edges[-1:], "right")))
    return np.diff(cum)


def category_counts(categories: np.ndarray, ref_counts: np.ndarray,
                    cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference and window rows per value of either side, values ascending."""
    at = np.minimum(categories.searchsorted(cur), categories.size - 1)
    known = categories[at] == cur
    cur_known = np.bincount(at[known], minlength=categories.size)
    if known.all():
        return ref_counts, cur_known
    new, new_counts = np.unique(cur[~known], return_counts=True)
    order = np.argsort(np.concatenate((categories, new)), kind="stable")
    zeros = np.zeros(new.size, dtype=np.int64)
    return (np.concatenate((ref_counts, zeros))[order],
            np.concatenate((cur_known, new_counts))[order])


# --- input checks -------------------------------------------------------------------------------

def _common_length(field: str, arrays: dict[str, np.ndarray]) -> int:
    for name, x in arrays.items():
        if x.ndim != 1:
            raise InvalidArgument(f"{field}[{quote(name)}]", f"must be one-dimensional; got shape {x.shape}")
    lengths = {x.size for x in arrays.values()}
    if len(lengths) > 1:
        raise InvalidArgument(field, f"columns differ in length: {sorted(lengths)[:5]}")
    return lengths.pop()


def _inferred_kind(x: np.ndarray) -> ColumnKind:
    return ColumnKind.NUMERIC if x.dtype.kind in "iuf" else ColumnKind.CATEGORICAL


def _numeric_values(field: str, x: np.ndarray) -> np.ndarray:
    """The finite values as float64 (object arrays: None is missing)."""
    if x.dtype.kind not in "biufO":
        raise InvalidArgument(field, f"is numeric; got {x.dtype} values")
    try:
        x = x.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise InvalidArgument(field, "is numeric; got values that are not numbers") from None
    finite = np.isfinite(x)
    return x if finite.all() else x[finite]


def _categorical_values(field: str, x: np.ndarray) -> np.ndarray:
    """The non-missing values: str arrays as they are, objects by str(), numbers as float64."""
    if x.dtype.kind == "U":
        return x
    if x.dtype.kind == "O":
        missing = np.equal(x, None) | (x != x)  # (x != x: NaN)
        return x[~missing].astype(str)
    if x.dtype.kind in "biuf":
        x = x.astype(np.float64, copy=False)
        return x[np.isfinite(x)]
    raise InvalidArgument(field, f"categorical values are strings, numbers or booleans; got {x.dtype}")


def _require_values(field: str, values: np.ndarray, rows: int) -> None:
    if values.size == 0:
        raise InvalidArgument(field, f"has no values: all {rows} rows are missing (NaN, None or infinite)")


def _frozen(x: np.ndarray) -> np.ndarray:
    x.setflags(write=False)
    return x
