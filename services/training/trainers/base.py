"""The trainer interface: one small class per model family (a new family is one module in this
package, listed in trainers/__init__.py).

A family builds a native model from parameters, fits it while reporting a validation score at
intermediate steps (boosting rounds, trees, epochs: what the pruner reads), gives the outputs the
metrics read (class probabilities, or predictions) and exports itself to ONNX with one float input
`input` of shape [rows, features] (export.py adds the per-column inputs around it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from services.training.types import ParamSpec, Task

#: report(step, validation output) -> None; raises to stop the fit (pruned, cancelled).
Report = Callable[[int, np.ndarray], None]


class Family(ABC):
    name: str

    @abstractmethod
    def space(self, task: Task) -> tuple[ParamSpec, ...]:
        """The default search space (what AutoML searches for this family)."""

    @abstractmethod
    def build(self, task: Task, params: dict[str, Any], seed: int, threads: int) -> Any:
        """A native model with these parameters (unknown ones are a ValueError naming them)."""

    @abstractmethod
    def fit(self, model: Any, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, report: Report) -> Any:
        """Fit, calling `report` with the validation output at each intermediate step."""

    def output(self, model: Any, X: np.ndarray, task: Task) -> np.ndarray:
        """Class probabilities (in model.classes_ order) or predictions."""
        return model.predict_proba(X) if task == Task.CLASSIFICATION else model.predict(X)

    @abstractmethod
    def export(self, model: Any, n_features: int, task: Task) -> onnx.ModelProto:
        """ONNX with input `input` float [None, n_features]; classifiers give `label` and
        `probabilities` (rows x classes), regressors `variable` (rows x 1)."""

    def importances(self, model: Any) -> np.ndarray | None:
        values = getattr(model, "feature_importances_", None)
        if values is None and hasattr(model, "coef_"):
            values = np.abs(np.atleast_2d(model.coef_)).mean(axis=0)
        return None if values is None else np.asarray(values, dtype=float)


def check_params(family: str, params: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"family {family!r} has no parameter(s) {unknown}; it takes {sorted(known)}")
