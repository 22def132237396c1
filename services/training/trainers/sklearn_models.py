"""scikit-learn families: `linear` (logistic regression / ridge), `random_forest` and
`hist_gradient_boosting`, exported with skl2onnx. Forests and boosting grow in steps
(warm_start) so a trial reports after each step and a poor one is pruned early."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from skl2onnx import to_onnx
from skl2onnx.common import tree_ensemble as _tree_ensemble
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge

from services.training.trainers.base import Family, Report, check_params
from services.training.types import ParamSpec, Task

STEPS = 5  # intermediate reports per fit

# skl2onnx 1.20 hands HistGradientBoosting's `missing_go_to_left` (a numpy bool in scikit-learn 1.9)
# to an ONNX integer attribute, which protobuf 7 refuses ("Expected an int, got a boolean"). Give it
# the int it means; drop this when skl2onnx converts it itself.
_add_node = _tree_ensemble.add_node


def _add_node_int_missing(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kwargs: Any) -> Any:
    return _add_node(*args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs)


_tree_ensemble.add_node = _add_node_int_missing


def _onnx(model: Any, n_features: int, task: Task) -> onnx.ModelProto:
    options = {id(model): {"zipmap": False}} if task == Task.CLASSIFICATION else None
    return to_onnx(model, initial_types=[("input", FloatTensorType([None, n_features]))], options=options,
                   target_opset={"": 17, "ai.onnx.ml": 3})


class Linear(Family):
    name = "linear"

    def space(self, task: Task) -> tuple[ParamSpec, ...]:
        key = "C" if task == Task.CLASSIFICATION else "alpha"
        return (ParamSpec(key, "float", low=1e-3, high=1e2, log=True),)

    def build(self, task: Task, params: dict[str, Any], seed: int, threads: int) -> Any:
        cls = LogisticRegression if task == Task.CLASSIFICATION else Ridge
        check_params(self.name, params, set(cls().get_params()))
        base = {"max_iter": 1000, "random_state": seed} if cls is LogisticRegression else {"random_state": seed}
        return cls(**{**base, **params})

    def fit(self, model: Any, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, report: Report) -> Any:
        model.fit(X, y)
        report(1, self.output(model, X_val, Task.CLASSIFICATION if hasattr(model, "classes_") else Task.REGRESSION))
        return model

    def export(self, model: Any, n_features: int, task: Task) -> onnx.ModelProto:
        return _onnx(model, n_features, task)


class _Staged(Family):
    """Families that grow an ensemble: `size_param` is raised in STEPS steps with warm_start."""

    size_param = ""
    classes: tuple[type, type] = (object, object)
    defaults: dict[str, Any] = {}

    def build(self, task: Task, params: dict[str, Any], seed: int, threads: int) -> Any:
        cls = self.classes[0] if task == Task.CLASSIFICATION else self.classes[1]
        known = set(cls().get_params())
        check_params(self.name, params, known)
        extra = {"n_jobs": threads} if "n_jobs" in known else {}  # histogram boosting: OpenMP, sized per worker
        return cls(**{**self.defaults, "random_state": seed, **extra, **params})

    def fit(self, model: Any, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, report: Report) -> Any:
        total = int(model.get_params()[self.size_param])
        task = Task.CLASSIFICATION if self.classes[0] is type(model) else Task.REGRESSION
        sizes = sorted({max(1, round(total * (i + 1) / STEPS)) for i in range(STEPS)})
        model.set_params(warm_start=True)
        for step, size in enumerate(sizes, 1):
            model.set_params(**{self.size_param: size})
            model.fit(X, y)
            report(step, self.output(model, X_val, task))
        model.set_params(warm_start=False)
        return model

    def export(self, model: Any, n_features: int, task: Task) -> onnx.ModelProto:
        return _onnx(model, n_features, task)


class RandomForest(_Staged):
    name = "random_forest"
    size_param = "n_estimators"
    classes = (RandomForestClassifier, RandomForestRegressor)
    defaults = {"n_estimators": 100}

    def space(self, task: Task) -> tuple[ParamSpec, ...]:
        return (ParamSpec("n_estimators", "int", low=20, high=200, log=True),
                ParamSpec("max_depth", "int", low=2, high=16),
                ParamSpec("min_samples_leaf", "int", low=1, high=20, log=True),
                ParamSpec("max_features", "float", low=0.2, high=1.0))


class HistGradientBoosting(_Staged):
    name = "hist_gradient_boosting"
    size_param = "max_iter"
    classes = (HistGradientBoostingClassifier, HistGradientBoostingRegressor)
    defaults = {"max_iter": 100, "early_stopping": False}

    def space(self, task: Task) -> tuple[ParamSpec, ...]:
        return (ParamSpec("learning_rate", "float", low=0.01, high=0.3, log=True),
                ParamSpec("max_iter", "int", low=50, high=300, log=True),
                ParamSpec("max_leaf_nodes", "int", low=8, high=64, log=True),
                ParamSpec("l2_regularization", "float", low=1e-6, high=1.0, log=True))
