"""Performance metrics equal scikit-learn's on the same rows (property-tested): binary and
multi-class classification with and without probabilities, numbers and strings as labels, and
regression; and what cannot be computed is said, never returned as NaN."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from services.monitoring.metrics import class_name, classification, regression


def close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-12 * max(1.0, abs(b))


def probabilities(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    p = rng.random((n, k)) + 1e-3
    return p / p.sum(axis=1, keepdims=True)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 300), k=st.integers(2, 5), text=st.booleans())
def test_classification_equals_scikit_learn(seed: int, n: int, k: int, text: bool) -> None:
    rng = np.random.default_rng(seed)
    classes = np.arange(k, dtype=np.float64) * 3 + 1  # not 0..k-1: the positive class is the larger label
    y = classes[rng.integers(0, k, n)]
    y[:k] = classes  # every class in the truth
    p = classes[rng.integers(0, k, n)]
    proba = probabilities(rng, n, k)
    if text:
        y, p, classes = (np.array([f"c{int(v):02d}" for v in a]) for a in (y, p, classes))
    m, note = classification(y, p, proba, classes)
    assert note == ""
    assert close(m.accuracy, skm.accuracy_score(y, p))
    if k == 2:
        pos = classes[1]
        assert (m.average, m.positive_class) == ("binary", class_name(pos))
        want = [f(y, p, pos_label=pos, zero_division=0) for f in (skm.precision_score, skm.recall_score, skm.f1_score)]
        assert close(m.roc_auc, skm.roc_auc_score(y, proba[:, 1]))
    else:
        assert m.average == "macro"
        want = [f(y, p, average="macro", zero_division=0) for f in
                (skm.precision_score, skm.recall_score, skm.f1_score)]
        assert close(m.roc_auc, skm.roc_auc_score(y, proba, multi_class="ovr", labels=classes))
    assert all(close(got, w) for got, w in zip((m.precision, m.recall, m.f1), want, strict=True)), (m, want)
    assert close(m.log_loss, skm.log_loss(y, proba, labels=classes))


def test_ties_in_scores_and_extreme_probabilities_equal_scikit_learn() -> None:
    y = np.array([0.0, 1, 1, 0, 1, 0, 1, 1])
    proba1 = np.array([0.5, 0.5, 1.0, 0.0, 0.5, 0.2, 1.0, 0.0])
    proba = np.column_stack((1 - proba1, proba1))
    m, _ = classification(y, (proba1 > 0.5).astype(float), proba, np.array([0.0, 1.0]))
    assert close(m.roc_auc, skm.roc_auc_score(y, proba1))
    assert close(m.log_loss, skm.log_loss(y, proba))  # 0 and 1 clipped to eps, 1 - eps


def test_precision_without_a_predicted_positive_is_zero_as_in_scikit_learn() -> None:
    y, p = np.array([1.0, 0, 1]), np.array([0.0, 0, 0])
    m, note = classification(y, p)
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)
    assert m.precision == skm.precision_score(y, p, zero_division=0)
    assert m.roc_auc is None and m.log_loss is None and "no probabilities" in note


def test_what_cannot_be_computed_is_said_not_returned_as_nan() -> None:
    proba = np.array([[0.9, 0.1], [0.2, 0.8]])
    m, note = classification(np.array([1.0, 1.0]), np.array([0.0, 1.0]), proba, np.array([0.0, 1.0]))
    assert m.roc_auc is None and "no row in the truth" in note  # one class only: sklearn raises
    assert close(m.log_loss, skm.log_loss([1, 1], proba, labels=[0, 1]))
    m, note = classification(np.array([2.0, 1.0]), np.array([1.0, 1.0]), proba, np.array([0.0, 1.0]))
    assert m.roc_auc is None and m.log_loss is None and "class 2" in note
    m, note = classification(np.array([0.0, 1.0]), np.array([1.0, 1.0]), proba * 2, np.array([0.0, 1.0]))
    assert m.roc_auc is None and "outside [0, 1]" in note


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 300), zeros=st.booleans())
def test_regression_equals_scikit_learn(seed: int, n: int, zeros: bool) -> None:
    rng = np.random.default_rng(seed)
    y = rng.normal(5, 3, n)
    if zeros:
        y[: n // 3] = 0.0  # MAPE's floor at float64's epsilon
    p = y + rng.normal(0, 1, n)
    m, note = regression(y, p)
    assert note == ""
    assert close(m.mae, skm.mean_absolute_error(y, p))
    assert close(m.rmse, skm.root_mean_squared_error(y, p))
    assert m.mape == pytest.approx(skm.mean_absolute_percentage_error(y, p), rel=1e-12)
    assert close(m.r2, skm.r2_score(y, p))


def test_r2_of_a_constant_truth_and_of_one_row() -> None:
    y = np.full(4, 2.0)
    assert regression(y, y)[0].r2 == skm.r2_score(y, y) == 1.0
    assert regression(y, y + 1)[0].r2 == skm.r2_score(y, y + 1) == 0.0
    m, note = regression(np.array([1.0]), np.array([2.0]))
    assert m.r2 is None and "two labelled rows" in note and m.mae == 1.0
