"""The data quality core (services/monitoring/quality.py) against numpy computed directly on the same
values: missing values (null, NaN, +-inf), out-of-range numbers at the reference's boundaries, type
mismatches by column kind, unseen categories with their most frequent examples, and the columns a
window lacks or adds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from services.monitoring.drift import ReferenceProfile
from services.monitoring.quality import UNSEEN_EXAMPLES, column_quality, version_quality
from services.monitoring.references import Profiles
from services.monitoring.types import Role


def profile(**columns: object) -> ReferenceProfile:
    return ReferenceProfile.from_columns(columns)


def test_numeric_nulls_and_out_of_range_equal_numpys_with_the_boundaries_in_range() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=1000)
    ref[:50] = np.nan
    lo, hi = np.nanmin(ref), np.nanmax(ref)
    cur = np.concatenate((rng.normal(scale=2, size=5000), [lo, hi, np.nextafter(lo, -np.inf), np.nextafter(hi, np.inf),
                                                           np.nan, np.inf, -np.inf]))
    nulls = np.zeros(cur.size, bool)
    nulls[rng.choice(cur.size - 7, 100, replace=False)] = True  # Arrow nulls besides the NaNs
    q = column_quality("x", Role.FEATURE, profile(x=ref).columns["x"], pa.array(cur, mask=nulls))
    missing = nulls | ~np.isfinite(cur)
    kept = cur[~missing]
    assert (q.rows, q.null_rows, q.values) == (cur.size, int(missing.sum()), kept.size)
    assert q.null_share == missing.sum() / cur.size
    assert q.reference_null_share == 50 / 1000
    assert (q.reference_min, q.reference_max) == (lo, hi)
    assert q.out_of_range == int(np.count_nonzero((kept < lo) | (kept > hi)))
    assert q.share(q.out_of_range) == q.out_of_range / kept.size
    assert (q.type_mismatches, q.unseen_rows, q.window_type) == (0, 0, "double")


def test_a_value_at_the_minimum_or_maximum_is_in_range_and_nan_is_missing_not_out_of_range() -> None:
    ref = profile(x=np.array([1.0, 2.0, 3.0])).columns["x"]
    q = column_quality("x", Role.FEATURE, ref, pa.array([1.0, 3.0, np.nan, np.inf, None]))
    assert (q.null_rows, q.out_of_range, q.values) == (3, 0, 2)
    q = column_quality("x", Role.FEATURE, ref, pa.array([0.999999, 3.000001, 2.0]))
    assert (q.null_rows, q.out_of_range) == (0, 2)
    # Integers against a float reference are numbers: range-checked, not mismatched.
    q = column_quality("x", Role.FEATURE, ref, pa.array([0, 1, 3, 4, None], pa.int64()))
    assert (q.window_type, q.null_rows, q.out_of_range, q.type_mismatches) == ("int64", 1, 2, 0)


def test_unseen_categories_count_share_and_the_most_frequent_examples_equal_numpys() -> None:
    rng = np.random.default_rng(2)
    ref = rng.choice(np.array(["a", "b", "c"]), 500)
    words = np.array([f"new{i:02d}" for i in range(15)] + ["a", "b", "c"])
    weights = np.r_[np.linspace(1, 2, 15), [20, 20, 20]]
    cur = rng.choice(words, 3000, p=weights / weights.sum())
    nulls = rng.random(cur.size) < 0.05
    column = pa.chunked_array([pa.array(cur, mask=nulls).dictionary_encode()])  # as a Parquet file reads back
    q = column_quality("c", Role.FEATURE, profile(c=ref).columns["c"], column)
    kept = cur[~nulls]
    unseen = kept[~np.isin(kept, ref)]
    values, counts = np.unique(unseen, return_counts=True)
    order = np.lexsort((values, -counts))
    assert (q.null_rows, q.values, q.window_type) == (int(nulls.sum()), kept.size, "string")
    assert (q.unseen_rows, q.unseen_categories) == (unseen.size, values.size)
    assert q.share(q.unseen_rows) == unseen.size / kept.size
    assert q.unseen_examples == tuple(values[order][:UNSEEN_EXAMPLES])
    assert (q.out_of_range, q.type_mismatches, q.reference_min) == (0, 0, None)


def test_examples_tie_by_value_and_none_are_reported_when_every_category_is_known() -> None:
    ref = profile(c=np.array(["x", "y"])).columns["c"]
    q = column_quality("c", Role.FEATURE, ref, pa.array(["z", "b", "a", "b", "x", "a", "c"]))
    assert (q.unseen_rows, q.unseen_categories, q.unseen_examples) == (6, 4, ("a", "b", "c", "z"))
    q = column_quality("c", Role.FEATURE, ref, pa.array(["x", "y", None]))
    assert (q.unseen_rows, q.unseen_categories, q.unseen_examples, q.null_rows) == (0, 0, (), 1)


@pytest.mark.parametrize(("reference", "window", "mismatched"), [
    (np.array([1.0, 2.0]), pa.array(["1.5", "oops", None]), 2),                 # strings in a numeric column
    (np.array([1.0, 2.0]), pa.array([True, False, None]), 2),                   # booleans are categories
    (np.array(["a", "b"]), pa.array([1.0, np.nan, 2.0, None]), 2),              # numbers in a categorical one
    (np.array(["a", "b"]), pa.array([7, 8, 9], pa.int32()), 3),
    (np.array(["true", "false"]), pa.array([True, None, False]), 0),           # booleans profiled as strings
    (np.array([1, 2, 3]), pa.array([2.5, 9.0], pa.float32()), 0),
])
def test_a_column_of_another_kind_than_the_reference_is_a_type_mismatch_of_every_value(
        reference: np.ndarray, window: pa.Array, mismatched: int) -> None:
    q = column_quality("c", Role.FEATURE, profile(c=reference).columns["c"], window)
    assert q.type_mismatches == mismatched
    if mismatched:  # neither range-checked nor looked up
        assert (q.out_of_range, q.unseen_rows, q.values) == (0, 0, mismatched)
        assert q.share(q.type_mismatches) == 1.0


def test_a_version_lists_the_reference_columns_it_lacks_and_the_columns_nobody_profiled() -> None:
    features = profile(a=np.array([0.0, 1.0]), b=np.array(["u", "v"]), gone=np.array([1.0, 2.0]))
    predictions = profile(label=np.array([0, 1]))
    rows = pa.table({
        "prediction_id": ["1", "2", "3"], "input.a": [0.5, 2.0, None], "input.b": ["u", "w", "w"],
        "input.new": [1, 2, 3], "input.other_version": pa.nulls(3, pa.float64()),
        "output.label": pa.array([1, 1, 0], pa.int64()), "output.probabilities[0]": [0.1, 0.2, 0.3]})
    v = version_quality("m", 2, True, rows, Profiles(features, predictions))
    assert (v.model, v.version, v.shadow, v.rows) == ("m", 2, True, 3)
    assert [(c.name, c.role, c.null_rows, c.out_of_range, c.unseen_rows) for c in v.features] == [
        ("a", Role.FEATURE, 1, 1, 0), ("b", Role.FEATURE, 0, 0, 2)]
    assert [(c.name, c.role, c.out_of_range) for c in v.predictions] == [("label", Role.PREDICTION, 0)]
    # An all-null column is one only another version has (the scan's schema is every version's).
    assert v.missing_columns == ("gone",)
    assert v.extra_columns == ("new", "probabilities[0]")
    # Without a profiled output every output is extra.
    v = version_quality("m", 2, False, rows, Profiles(features, None))
    assert (v.predictions, v.extra_columns) == ((), ("new", "label", "probabilities[0]"))
