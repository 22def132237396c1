"""The drift core against scipy computed directly on the same data: every score equals what
Evidently's formulas give (scipy's functions on the non-missing values, bins built as Evidently
builds them), the default method follows Evidently's table at its boundaries, the comparison
operators hold at equality, and missing, constant and malformed input gets a clear value or an
InvalidArgument naming the field."""

from __future__ import annotations

import ast
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial import distance

from services.common.errors import InvalidArgument
from services.monitoring import drift
from services.monitoring.drift import (
    ColumnKind, Method, Override, ReferenceProfile, choose_method, drift_report,
)

NUMERIC_METHODS = (Method.KS, Method.WASSERSTEIN, Method.JENSENSHANNON, Method.PSI)
CATEGORICAL_METHODS = (Method.CHISQUARE, Method.Z, Method.JENSENSHANNON, Method.PSI)


def close(got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)


def one(ref: np.ndarray, cur: np.ndarray, kind: ColumnKind, method: Method | None = None,
        threshold: float | None = None) -> drift.FeatureDrift:
    """The report's result for a single column "x"."""
    profile = ReferenceProfile.from_columns({"x": ref}, kinds={"x": kind})
    overrides = {"x": Override(method, threshold)} if method or threshold is not None else None
    (feature,) = drift_report(profile, {"x": cur}, overrides).features
    return feature


def refused(call, *args, **kwargs) -> str:
    with pytest.raises(InvalidArgument) as e:
        call(*args, **kwargs)
    return e.value.field


# --- what Evidently computes, written out plainly ------------------------------------------------

def binned(ref: np.ndarray, cur: np.ndarray, kind: ColumnKind) -> tuple[np.ndarray, np.ndarray]:
    """Evidently's get_binned_data: Sturges over both sides for a numeric column with more than 20
    distinct reference values, else one bin per value of either side; shares, no zero fill."""
    if kind is ColumnKind.NUMERIC and len(set(ref.tolist())) > 20:
        edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins="sturges")
        return np.histogram(ref, edges)[0] / len(ref), np.histogram(cur, edges)[0] / len(cur)
    keys = list(set(ref.tolist()) | set(cur.tolist()))
    rc, cc = Counter(ref.tolist()), Counter(cur.tolist())
    return np.array([rc[k] / len(ref) for k in keys]), np.array([cc[k] / len(cur) for k in keys])


def psi_expected(ref_shares: np.ndarray, cur_shares: np.ndarray) -> float:
    def fill(p: np.ndarray) -> list[float]:
        smallest = min(v for v in p if v != 0)
        empty = smallest / 1e6 if smallest <= 0.0001 else 0.0001
        return [v if v != 0 else empty for v in p]

    return sum((r - c) * math.log(r / c) for r, c in zip(fill(ref_shares), fill(cur_shares), strict=True))


def chisquare_expected(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    keys = list(set(ref.tolist()) | set(cur.tolist()))
    rc, cc = Counter(ref.tolist()), Counter(cur.tolist())
    with np.errstate(divide="ignore"):
        r = stats.chisquare([cc[k] for k in keys], [rc[k] * len(cur) / len(ref) for k in keys])
    return float(r.statistic), float(r.pvalue)


def z_expected(ref: np.ndarray, cur: np.ndarray) -> float:
    """The two-sided two-proportion Z-test p-value, as scipy's chi-square test of independence on
    the 2x2 table (first value, the rest) x (reference, window) without continuity correction:
    the same test (z^2 is that chi-square), computed another way."""
    first = min(set(ref.tolist()) | set(cur.tolist()))
    if set(ref.tolist()) == set(cur.tolist()) == {first}:
        return 1.0
    a, b = int(np.sum(ref == first)), int(np.sum(cur == first))
    return float(stats.chi2_contingency([[a, len(ref) - a], [b, len(cur) - b]], correction=False).pvalue)


def wasserstein_expected(ref: np.ndarray, cur: np.ndarray) -> float:
    return stats.wasserstein_distance(ref, cur) / max(np.std(ref), 0.001)


# --- every score equals scipy's ------------------------------------------------------------------

@st.composite
def numeric_pairs(draw) -> tuple[np.ndarray, np.ndarray]:
    """Columns of 1-150 values: few distinct values (ties, 1-5 values: chi-square and Z), about 20
    (both sides of the Sturges switch), or continuous."""
    k = draw(st.integers(1, 40))
    grid = st.integers(0, k - 1).map(lambda v: v * 0.25 - 2)
    spread = draw(st.sampled_from([0.0, 0.3, 1.0]))
    values = st.one_of(grid, st.floats(-1e3, 1e3, allow_subnormal=False)) if spread else grid
    shift = draw(st.sampled_from([0.0, 0.5]))
    ref = np.array(draw(st.lists(values, min_size=1, max_size=150)))
    cur = np.array(draw(st.lists(values, min_size=1, max_size=150))) + shift
    return ref, cur


@st.composite
def categorical_pairs(draw) -> tuple[np.ndarray, np.ndarray]:
    alphabet = draw(st.sampled_from(["ab", "abc", "abcdefgh"]))
    values = st.text(alphabet, max_size=2)
    ref = np.array(draw(st.lists(values, min_size=1, max_size=150)), dtype=str)
    cur = np.array(draw(st.lists(values, min_size=1, max_size=150)), dtype=str)
    return ref, cur


@settings(deadline=None)
@given(numeric_pairs())
def test_numeric_scores_equal_scipy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    ref, cur = pair
    ref_shares, cur_shares = binned(ref, cur, ColumnKind.NUMERIC)
    psi = psi_expected(ref_shares, cur_shares)
    ks = stats.ks_2samp(ref, cur)
    expected = {
        Method.KS: (ks.pvalue, ks.statistic),
        Method.WASSERSTEIN: (wasserstein_expected(ref, cur),) * 2,
        Method.JENSENSHANNON: (distance.jensenshannon(ref_shares, cur_shares),) * 2,
        Method.PSI: (psi, psi),
    }
    for method, (score, statistic) in expected.items():
        f = one(ref, cur, ColumnKind.NUMERIC, method)
        assert f.method is method
        assert close(f.score, score), (method, f.score, score)
        assert close(f.statistic, statistic), (method, f.statistic, statistic)
        assert close(f.psi, psi)
    # The default for a reference this small: KS, or chi-square / Z over at most 5 values.
    default = one(ref, cur, ColumnKind.NUMERIC)
    n_unique = len(set(ref.tolist()) | set(cur.tolist()))
    assert default.n_unique == n_unique
    if n_unique > 5:
        assert default.method is Method.KS and close(default.score, ks.pvalue)
    elif n_unique > 2:
        assert default.method is Method.CHISQUARE
        assert close(default.statistic, chisquare_expected(ref, cur)[0])
        assert close(default.score, chisquare_expected(ref, cur)[1])
    else:
        assert default.method is Method.Z and math.isclose(default.score, z_expected(ref, cur), abs_tol=1e-9)


@settings(deadline=None)
@given(categorical_pairs())
def test_categorical_scores_equal_scipy(pair: tuple[np.ndarray, np.ndarray]) -> None:
    ref, cur = pair
    ref_shares, cur_shares = binned(ref, cur, ColumnKind.CATEGORICAL)
    psi = psi_expected(ref_shares, cur_shares)
    for method in CATEGORICAL_METHODS:
        f = one(ref, cur, ColumnKind.CATEGORICAL, method)
        assert close(f.psi, psi)
        if method is Method.CHISQUARE:
            if len(set(ref.tolist()) | set(cur.tolist())) > 1:  # (one value: see the constant test)
                statistic, p = chisquare_expected(ref, cur)
                assert close(f.statistic, statistic) and close(f.score, p), (f, statistic, p)
        elif method is Method.Z:
            # (z_expected reaches p another way; 1 - cdf in Evidently's formula rounds near 0.)
            assert math.isclose(f.score, z_expected(ref, cur), abs_tol=1e-9), (f, z_expected(ref, cur))
        elif method is Method.JENSENSHANNON:
            assert close(f.score, distance.jensenshannon(ref_shares, cur_shares))
        else:
            assert close(f.score, psi)


@settings(deadline=None)
@given(categorical_pairs())
def test_z_statistic_is_evidentlys_formula(pair: tuple[np.ndarray, np.ndarray]) -> None:
    """z_stattest.py line by line: 0 for the smallest value, 1 for the rest; pooled proportion."""
    ref, cur = pair
    keys = sorted(set(ref.tolist()) | set(cur.tolist()))
    f = one(ref, cur, ColumnKind.CATEGORICAL, Method.Z)
    if len(keys) == 1:
        assert (f.statistic, f.score, f.drifted) == (0.0, 1.0, False)
        return
    a, b = [0 if x == keys[0] else 1 for x in ref], [0 if x == keys[0] else 1 for x in cur]
    p1, p2 = sum(a) / len(a), sum(b) / len(b)
    pooled = (p1 * len(a) + p2 * len(b)) / (len(a) + len(b))
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
    assert close(f.statistic, z)
    assert close(f.score, 2 * (1 - stats.norm.cdf(abs(z))))


@pytest.mark.parametrize("seed", [0, 1])
def test_large_reference_defaults_equal_scipy(seed: int) -> None:
    """Past 1000 reference rows: normed Wasserstein for a numeric column with more than 5 values,
    Jensen-Shannon for one with at most 5 and for categories; PSI beside each."""
    rng = np.random.default_rng(seed)
    ref = {"wide": rng.normal(size=5000), "few": rng.integers(0, 5, 5000).astype(float),
           "cat": rng.choice(np.array(["a", "b", "c", "d"]), 5000)}
    cur = {"wide": rng.normal(0.2, 1.3, size=3000), "few": rng.integers(0, 4, 3000).astype(float),
           "cat": rng.choice(np.array(["a", "b", "c", "e"]), 3000, p=[0.4, 0.3, 0.2, 0.1])}
    kinds = {"cat": ColumnKind.CATEGORICAL}
    report = drift_report(ReferenceProfile.from_columns(ref, kinds), cur)
    got = {f.name: f for f in report.features}
    assert got["wide"].method is Method.WASSERSTEIN
    assert close(got["wide"].score, wasserstein_expected(ref["wide"], cur["wide"]))
    for name in ("few", "cat"):
        kind = ColumnKind.CATEGORICAL if name == "cat" else ColumnKind.NUMERIC
        r, c = binned(ref[name], cur[name], kind)
        assert got[name].method is Method.JENSENSHANNON
        assert close(got[name].score, distance.jensenshannon(r, c))
        assert close(got[name].psi, psi_expected(r, c))
    r, c = binned(ref["wide"], cur["wide"], ColumnKind.NUMERIC)
    assert close(got["wide"].psi, psi_expected(r, c))


def test_sorted_merge_counts_every_value_once() -> None:
    ref, cur = np.array([1.0, 2.0, 2.0, 5.0]), np.array([2.0, 3.0, 5.0, 5.0, 5.0])
    merged = drift.SortedMerge.of(ref, cur)
    assert merged.deltas.tolist() == np.diff(sorted(ref.tolist() + cur.tolist())).tolist()
    assert merged.n_unique == 4
    assert [c.tolist() for c in merged.value_counts()] == [[1, 2, 0, 1], [0, 1, 1, 3]]


# --- method choice at the boundaries --------------------------------------------------------------

@pytest.mark.parametrize(("kind", "rows", "n_unique", "method"), [
    (ColumnKind.NUMERIC, 1000, 6, Method.KS),
    (ColumnKind.NUMERIC, 1001, 6, Method.WASSERSTEIN),
    (ColumnKind.NUMERIC, 1000, 5, Method.CHISQUARE),
    (ColumnKind.NUMERIC, 1000, 3, Method.CHISQUARE),
    (ColumnKind.NUMERIC, 1000, 2, Method.Z),
    (ColumnKind.NUMERIC, 1, 1, Method.Z),
    (ColumnKind.NUMERIC, 1001, 5, Method.JENSENSHANNON),
    (ColumnKind.NUMERIC, 1001, 1, Method.JENSENSHANNON),
    (ColumnKind.CATEGORICAL, 1000, 3, Method.CHISQUARE),
    (ColumnKind.CATEGORICAL, 1000, 200, Method.CHISQUARE),
    (ColumnKind.CATEGORICAL, 1000, 2, Method.Z),
    (ColumnKind.CATEGORICAL, 1001, 2, Method.JENSENSHANNON),
    (ColumnKind.CATEGORICAL, 1001, 200, Method.JENSENSHANNON),
])
def test_choose_method_is_evidentlys_table(kind: ColumnKind, rows: int, n_unique: int,
                                          method: Method) -> None:
    assert choose_method(kind, rows, n_unique) is method


def test_size_rule_counts_non_missing_reference_rows() -> None:
    values = np.arange(1001) % 7.0
    assert one(values, values[:50], ColumnKind.NUMERIC).method is Method.WASSERSTEIN
    with_nan = values.copy()
    with_nan[0] = np.nan  # 1000 rows left: small
    f = one(with_nan, values[:50], ColumnKind.NUMERIC)
    assert (f.method, f.n_reference) == (Method.KS, 1000)


def test_n_unique_counts_reference_and_window_together() -> None:
    ref = np.arange(100) % 5.0                       # 5 values: chi-square alone
    assert one(ref, ref[:10], ColumnKind.NUMERIC).method is Method.CHISQUARE
    f = one(ref, np.array([0.0, 1.0, 7.0]), ColumnKind.NUMERIC)  # a sixth value in the window
    assert (f.method, f.n_unique) == (Method.KS, 6)
    two = np.array(["a", "b"] * 10)
    assert one(two, two, ColumnKind.CATEGORICAL).method is Method.Z
    assert one(two, np.array(["a", "c"]), ColumnKind.CATEGORICAL).method is Method.CHISQUARE
    pair = np.array([0.0, 1.0] * 10)
    assert one(pair, pair, ColumnKind.NUMERIC).method is Method.Z
    assert one(pair, np.array([2.0]), ColumnKind.NUMERIC).method is Method.CHISQUARE


@pytest.mark.parametrize("distinct", [20, 21])
def test_numeric_bins_switch_to_sturges_past_20_reference_values(distinct: int) -> None:
    ref = np.repeat(np.arange(distinct, dtype=float), 10)
    cur = np.concatenate([np.arange(distinct, dtype=float), np.full(40, 3.0), np.full(30, 11.0)])
    keys = sorted(set(ref.tolist()) | set(cur.tolist()))
    per_value = psi_expected(np.array([np.sum(ref == k) / ref.size for k in keys]),
                             np.array([np.sum(cur == k) / cur.size for k in keys]))
    edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins="sturges")
    sturges = psi_expected(np.histogram(ref, edges)[0] / ref.size, np.histogram(cur, edges)[0] / cur.size)
    assert not close(per_value, sturges)  # (so the bins decide the result)
    f = one(ref, cur, ColumnKind.NUMERIC, Method.PSI)
    assert close(f.score, per_value if distinct <= 20 else sturges)


# --- operators at equality ------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "method", "at_equality"), [
    (ColumnKind.NUMERIC, Method.KS, True),                  # p <= threshold
    (ColumnKind.CATEGORICAL, Method.CHISQUARE, False),      # p < threshold
    (ColumnKind.CATEGORICAL, Method.Z, False),
    (ColumnKind.NUMERIC, Method.WASSERSTEIN, True),         # distance >= threshold
    (ColumnKind.NUMERIC, Method.JENSENSHANNON, True),
    (ColumnKind.CATEGORICAL, Method.JENSENSHANNON, True),
    (ColumnKind.NUMERIC, Method.PSI, True),
])
def test_operators_at_equality(kind: ColumnKind, method: Method, at_equality: bool) -> None:
    rng = np.random.default_rng(3)
    if kind is ColumnKind.NUMERIC:
        ref, cur = rng.normal(size=300), rng.normal(0.15, 1, size=200)
    else:
        ref, cur = rng.choice(np.array(["a", "b", "c"]), 300), rng.choice(np.array(["a", "b", "c"]), 200)
    score = one(ref, cur, kind, method).score
    assert one(ref, cur, kind, method, score).drifted is at_equality
    below, above = np.nextafter(score, -np.inf), np.nextafter(score, np.inf)
    if method.is_p_value:
        assert one(ref, cur, kind, method, above).drifted and not one(ref, cur, kind, method, below).drifted
    else:
        assert one(ref, cur, kind, method, below).drifted and not one(ref, cur, kind, method, above).drifted


def test_default_thresholds() -> None:
    ref = np.arange(50, dtype=float)
    assert one(ref, ref, ColumnKind.NUMERIC).threshold == 0.05
    assert one(ref, ref, ColumnKind.NUMERIC, Method.WASSERSTEIN).threshold == 0.1
    assert one(ref, ref, ColumnKind.NUMERIC, Method.PSI).threshold == 0.1


def test_dataset_drifts_when_the_drifted_share_reaches_drift_share() -> None:
    rng = np.random.default_rng(5)
    ref = {"moved": rng.normal(size=500), "still": rng.normal(size=500)}
    cur = {"moved": rng.normal(3, 1, size=500), "still": ref["still"].copy()}
    profile = ReferenceProfile.from_columns(ref)
    report = drift_report(profile, cur)
    assert [f.drifted for f in report.features] == [True, False]
    assert (report.n_drifted, report.share_drifted, report.dataset_drifted) == (1, 0.5, True)
    assert not drift_report(profile, cur, drift_share=0.51).dataset_drifted


# --- missing, constant and empty ------------------------------------------------------------------

def test_missing_values_are_dropped_and_reported() -> None:
    ref = np.array([1.0, np.nan, 2.0, 3.5, np.inf, 4.0, 2.5, -1.0])
    cur = np.array([1.5, None, np.nan, 2.0, -np.inf, 3.0, 9.0, 0.5, 2.0, 2.0], dtype=object)
    clean_ref, clean_cur = ref[np.isfinite(ref)], np.array([1.5, 2.0, 3.0, 9.0, 0.5, 2.0, 2.0])
    f = one(ref, cur, ColumnKind.NUMERIC, Method.KS)
    assert (f.n_reference, f.n_current, f.null_share, f.reference_null_share) == (6, 7, 0.3, 0.25)
    assert close(f.score, stats.ks_2samp(clean_ref, clean_cur).pvalue)
    w = one(ref, cur, ColumnKind.NUMERIC, Method.WASSERSTEIN)
    assert close(w.score, wasserstein_expected(clean_ref, clean_cur))
    cats = np.array(["a", None, "b", float("nan"), "a"], dtype=object)
    c = one(np.array(["a", "b", "b"]), cats, ColumnKind.CATEGORICAL, Method.CHISQUARE)
    assert (c.n_current, c.null_share) == (3, 0.4)
    assert close(c.score, chisquare_expected(np.array(["a", "b", "b"]), np.array(["a", "b", "a"]))[1])


def test_constant_columns_get_clear_scores() -> None:
    same = np.full(20, 3.0)
    z = one(same, same, ColumnKind.NUMERIC)                       # 1 value, small: Z
    assert (z.method, z.score, z.drifted) == (Method.Z, 1.0, False)
    big = np.full(1500, 3.0)
    js = one(big, same, ColumnKind.NUMERIC)                       # 1 value, large: Jensen-Shannon
    assert (js.method, js.score, js.psi, js.drifted) == (Method.JENSENSHANNON, 0.0, 0.0, False)
    assert one(big, same, ColumnKind.NUMERIC, Method.WASSERSTEIN).score == 0.0
    moved = one(big, np.full(10, 3.5), ColumnKind.NUMERIC, Method.WASSERSTEIN)  # std 0: normed by 0.001
    assert close(moved.score, 0.5 / 0.001) and moved.drifted
    chi = one(np.array(["a"] * 5), np.array(["a"] * 3), ColumnKind.CATEGORICAL, Method.CHISQUARE)
    assert (chi.statistic, chi.score, chi.drifted) == (0.0, 1.0, False)   # scipy alone: NaN


def test_window_category_the_reference_never_had() -> None:
    ref, cur = np.array(["a", "b", "a"]), np.array(["a", "c"])
    f = one(ref, cur, ColumnKind.CATEGORICAL, Method.CHISQUARE)
    assert (f.statistic, f.score, f.drifted) == (math.inf, 0.0, True)
    assert chisquare_expected(ref, cur) == (math.inf, 0.0)
    assert math.isfinite(f.psi) and close(f.psi, psi_expected(*binned(ref, cur, ColumnKind.CATEGORICAL)))


@settings(deadline=None)
@given(numeric_pairs(), st.data())
def test_no_score_is_nan(pair: tuple[np.ndarray, np.ndarray], data: st.DataObject) -> None:
    ref, cur = pair
    method = data.draw(st.sampled_from((None, *NUMERIC_METHODS)))
    f = one(ref, cur, ColumnKind.NUMERIC, method)
    assert not any(math.isnan(v) for v in (f.score, f.statistic, f.psi))


def test_numeric_categories_and_booleans() -> None:
    ref, cur = np.array([1, 2, 2, 3, 3, 3]), np.array([1.0, 3.0, np.nan, 4.0])
    f = one(ref, cur, ColumnKind.CATEGORICAL, Method.CHISQUARE)
    assert (f.n_current, f.n_unique) == (3, 4)
    assert close(f.score, chisquare_expected(ref.astype(float), np.array([1.0, 3.0, 4.0]))[1])
    profile = ReferenceProfile.from_columns({"flag": np.array([True, False, True])})
    assert profile.columns["flag"].kind is ColumnKind.CATEGORICAL  # booleans are categories
    (b,) = drift_report(profile, {"flag": np.array([True, True])}).features
    assert b.method is Method.Z and close(b.score, z_expected(np.array([1, 0, 1]), np.array([1, 1])))


# --- refused input names the field ----------------------------------------------------------------

def test_bad_windows_are_refused_naming_the_field() -> None:
    profile = ReferenceProfile.from_columns({"x": np.arange(10.0), "c": np.array(list("abcabcabca"))})
    ok = {"x": np.arange(3.0), "c": np.array(["a", "b", "c"])}
    assert refused(drift_report, profile, {"x": np.array([]), "c": np.array([], dtype=str)}) == "window"
    assert refused(drift_report, profile, {**ok, "x": np.arange(4.0)}) == "window"  # lengths differ
    assert refused(drift_report, profile, {"c": ok["c"]}) == "window['x']"           # missing
    assert refused(drift_report, profile, {**ok, "y": ok["x"]}) == "window['y']"     # extra
    assert refused(drift_report, profile, {**ok, "x": np.full(3, np.nan)}) == "window['x']"  # all missing
    assert refused(drift_report, profile, {**ok, "x": np.array(["1", "2", "3"])}) == "window['x']"
    assert refused(drift_report, profile, {**ok, "x": np.array(["a", 1, 2], dtype=object)}) == "window['x']"
    assert refused(drift_report, profile, {**ok, "c": np.array([1.0, 2.0, 3.0])}) == "window['c']"
    assert refused(drift_report, profile, {**ok, "x": np.ones((3, 1))}) == "window['x']"
    assert refused(drift_report, profile, ok, drift_share=0) == "drift_share"


def test_bad_overrides_are_refused_naming_the_field() -> None:
    profile = ReferenceProfile.from_columns({"x": np.arange(10.0), "c": np.array(list("abcabcabca"))})
    ok = {"x": np.arange(3.0), "c": np.array(["a", "b", "c"])}
    assert refused(drift_report, profile, ok, {"nope": Override("ks")}) == "overrides['nope']"
    assert refused(drift_report, profile, ok, {"x": Override("t-test")}) == "overrides['x'].method"
    assert refused(drift_report, profile, ok, {"x": Override("chisquare")}) == "overrides['x'].method"
    assert refused(drift_report, profile, ok, {"c": Override("wasserstein")}) == "overrides['c'].method"
    assert refused(drift_report, profile, ok, {"x": Override("ks", 1.5)}) == "overrides['x'].threshold"
    assert refused(drift_report, profile, ok, {"x": Override(threshold=-0.1)}) == "overrides['x'].threshold"
    assert refused(drift_report, profile, ok, {"x": Override("psi", math.nan)}) == "overrides['x'].threshold"
    assert one(np.arange(10.0), np.arange(3.0), ColumnKind.NUMERIC, Method.PSI, 2.5).threshold == 2.5


def test_bad_references_are_refused_naming_the_field() -> None:
    build = ReferenceProfile.from_columns
    assert refused(build, {}) == "reference"
    assert refused(build, {"x": np.array([])}) == "reference"
    assert refused(build, {"x": np.arange(3.0), "y": np.arange(4.0)}) == "reference"
    assert refused(build, {"x": np.array([np.nan, np.inf])}) == "reference['x']"
    assert refused(build, {"c": np.array([None, None], dtype=object)}) == "reference['c']"
    assert refused(build, {"x": np.arange(3.0)}, kinds={"y": "numeric"}) == "kinds['y']"
    assert refused(build, {"x": np.arange(3.0)}, kinds={"x": "text"}) == "kinds['x']"
    assert refused(choose_method, ColumnKind.NUMERIC, 0, 3) == "reference_rows"


def test_drift_module_imports_only_numpy_scipy_and_the_errors() -> None:
    """The domain core: no protobuf, gRPC or transport of its own (grpc arrives only through
    services.common.errors, which declares each error's status code)."""
    tree = ast.parse(Path(drift.__file__).read_text())
    imported = {n.name for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    allowed = {"__future__", "enum", "collections.abc", "dataclasses", "types", "typing", "numpy", "scipy",
               "scipy.spatial", "services.common.errors"}
    assert imported <= allowed, imported - allowed
