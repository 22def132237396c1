"""Held-out metrics and their directions, computed with scikit-learn. `score` is the one
function HPO, the gate and the final report all use, so a trial, the candidate and the champion
are measured the same way."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as m

from services.training.types import Task

#: metric -> True when larger is better.
MAXIMIZE = {"roc_auc": True, "accuracy": True, "f1": True, "log_loss": False,
            "rmse": False, "mae": False, "r2": True, "mape": False}
BY_TASK = {Task.CLASSIFICATION: ("roc_auc", "accuracy", "f1", "log_loss"),
           Task.REGRESSION: ("rmse", "mae", "r2", "mape")}
DEFAULT = {Task.CLASSIFICATION: "roc_auc", Task.REGRESSION: "rmse"}


def score(metric: str, task: Task, y: np.ndarray, output: np.ndarray, classes: np.ndarray | None = None) -> float:
    """`output`: class probabilities (rows x classes, in `classes` order) for classification,
    predictions for regression."""
    if task == Task.CLASSIFICATION:
        labels = classes[np.argmax(output, axis=1)]
        if metric == "accuracy":
            return float(m.accuracy_score(y, labels))
        if metric == "f1":
            return float(m.f1_score(y, labels, average="binary" if len(classes) == 2 else "macro",
                                    pos_label=classes[-1] if len(classes) == 2 else 1))
        if metric == "log_loss":
            return float(m.log_loss(y, np.clip(output, 1e-15, 1), labels=classes))
        if metric == "roc_auc":
            if len(np.unique(y)) < 2:
                return float("nan")
            if len(classes) == 2:
                return float(m.roc_auc_score(y == classes[1], output[:, 1]))
            return float(m.roc_auc_score(y, output, multi_class="ovr", labels=classes))
    else:
        if metric == "rmse":
            return float(np.sqrt(m.mean_squared_error(y, output)))
        if metric == "mae":
            return float(m.mean_absolute_error(y, output))
        if metric == "r2":
            return float(m.r2_score(y, output))
        if metric == "mape":
            return float(m.mean_absolute_percentage_error(y, output))
    raise ValueError(f"metric {metric!r} is not one of {BY_TASK[task]}")


def all_scores(task: Task, y: np.ndarray, output: np.ndarray, classes: np.ndarray | None = None) -> dict[str, float]:
    return {name: score(name, task, y, output, classes) for name in BY_TASK[task]}


def better(metric: str, a: float, b: float, margin: float = 0.0) -> bool:
    """`a` beats `b` by at least `margin` in the metric's better direction."""
    return a >= b + margin if MAXIMIZE[metric] else a <= b - margin
