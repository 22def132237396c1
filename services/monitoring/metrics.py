"""Performance metrics on labelled predictions, each equal to scikit-learn's on the same rows
(tests/monitoring/test_metrics.py holds them to it), in numpy: the service does not need
scikit-learn.

Classification (labels compared as equal values: numbers with numbers, strings with strings):
- accuracy: share of rows predicted right (`accuracy_score`);
- precision, recall, F1: with at most two labels among truth and predictions, of the positive class,
  the larger label (`average="binary", pos_label=<larger label>`); with more, the unweighted mean over
  the labels seen (`average="macro"`); 0 where a ratio's denominator is 0 (`zero_division` default);
- ROC AUC from the probabilities of the positive class (two classes: `roc_auc_score(y, p[:, 1])`),
  or one-vs-rest, macro-averaged (`multi_class="ovr"`); undefined when a class of the probability
  columns has no row in the truth;
- log loss (`log_loss(y, p, labels=classes)`): probabilities clipped to [eps, 1 - eps].
Regression: MAE, RMSE, MAPE (|truth| floored at float64's epsilon), R2 (1 when the truth is
constant and predicted exactly, 0 when constant and not; undefined under two rows).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from services.monitoring.types import ClassificationMetrics, RegressionMetrics


def class_name(value: object) -> str:
    """A class as text: whole numbers without a fraction ("1", not "1.0")."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def classification(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None = None,
                   classes: np.ndarray | None = None) -> tuple[ClassificationMetrics, str]:
    """Metrics and a note on what could not be computed. `proba`: [rows, classes] with `classes`
    naming its columns in order (both or neither)."""
    labels = np.unique(np.concatenate((y_true, y_pred)))
    accuracy = float(np.mean(y_true == y_pred))
    if labels.size <= 2:
        positive = labels[-1]
        precision, recall, f1 = _prf(y_true == positive, y_pred == positive)
        average, positive_name = "binary", class_name(positive)
    else:
        scores = np.array([_prf(y_true == c, y_pred == c) for c in labels])
        precision, recall, f1 = (float(x) for x in scores.mean(axis=0))
        average, positive_name = "macro", ""
    roc_auc = log_loss = None
    note = ""
    names: tuple[str, ...] = ()
    if proba is not None and classes is not None:
        names = tuple(class_name(c) for c in classes)
        unknown = ~np.isin(y_true, classes)
        if unknown.any():
            note = (f"the truth holds class {class_name(y_true[unknown][0])}, which is not among the probability "
                    f"columns' classes {list(names)}: no ROC AUC or log loss")
        elif proba.min() < 0 or proba.max() > 1:
            note = "the probabilities lie outside [0, 1]: no ROC AUC or log loss"
        else:
            log_loss = _log_loss(y_true, proba, classes)
            roc_auc, note = _roc_auc(y_true, proba, classes)
    elif proba is None:
        note = "no probabilities: no ROC AUC or log loss"
    return ClassificationMetrics(accuracy, precision, recall, f1, roc_auc, log_loss, names, average,
                                 positive_name), note


def _prf(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    tp = int(np.count_nonzero(truth & predicted))
    fp = int(np.count_nonzero(~truth & predicted))
    fn = int(np.count_nonzero(truth & ~predicted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return precision, recall, f1


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney with average ranks for ties: the area under the ROC curve."""
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.size - n_pos
    ranks = stats.rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _roc_auc(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> tuple[float | None, str]:
    present = np.isin(classes, y_true)
    if not present.all():
        return None, (f"class(es) {[class_name(c) for c in classes[~present]]} have no row in the truth: "
                      "no ROC AUC")
    if classes.size == 2:
        return _binary_auc(y_true == classes[1], proba[:, 1]), ""
    return float(np.mean([_binary_auc(y_true == c, proba[:, j]) for j, c in enumerate(classes)])), ""


def _log_loss(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    eps = np.finfo(proba.dtype).eps
    order = np.argsort(classes)
    column = order[np.searchsorted(classes[order], y_true)]
    p = np.clip(proba[np.arange(y_true.size), column], eps, 1 - eps)
    return float(-np.mean(np.log(p)))


def regression(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[RegressionMetrics, str]:
    error = y_pred - y_true
    mae = float(np.mean(np.abs(error)))
    rmse = float(np.sqrt(np.mean(error ** 2)))
    mape = float(np.mean(np.abs(error) / np.maximum(np.abs(y_true), np.finfo(np.float64).eps)))
    if y_true.size < 2:
        return RegressionMetrics(mae, rmse, mape, None), "R2 needs at least two labelled rows"
    residual = float(np.sum(error ** 2))
    total = float(np.sum((y_true - np.mean(y_true)) ** 2))
    r2 = 1.0 - residual / total if total else (1.0 if residual == 0 else 0.0)
    return RegressionMetrics(mae, rmse, mape, r2), ""
