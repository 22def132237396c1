"""LightGBM and XGBoost (their scikit-learn estimators), exported with onnxmltools. A callback
reports the validation output every few rounds, so the pruner stops a poor trial mid-fit."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from services.training.trainers.base import Family, Report, check_params
from services.training.types import ParamSpec, Task

REPORT_EVERY = 10  # rounds


def _convert(model: Any, n_features: int, task: Task, kind: str) -> onnx.ModelProto:
    from onnxmltools import convert_lightgbm, convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    types = [("input", FloatTensorType([None, n_features]))]
    convert = convert_lightgbm if kind == "lightgbm" else convert_xgboost
    kwargs = {"zipmap": False} if task == Task.CLASSIFICATION and kind == "lightgbm" else {}
    return convert(model, initial_types=types, target_opset=15, **kwargs)  # onnxmltools 1.16 goes up to 15


class LightGBM(Family):
    name = "lightgbm"

    def space(self, task: Task) -> tuple[ParamSpec, ...]:
        return (ParamSpec("learning_rate", "float", low=0.01, high=0.3, log=True),
                ParamSpec("n_estimators", "int", low=50, high=400, log=True),
                ParamSpec("num_leaves", "int", low=8, high=128, log=True),
                ParamSpec("min_child_samples", "int", low=5, high=100, log=True),
                ParamSpec("subsample", "float", low=0.5, high=1.0),
                ParamSpec("colsample_bytree", "float", low=0.5, high=1.0))

    def build(self, task: Task, params: dict[str, Any], seed: int, threads: int) -> Any:
        import lightgbm as lgb

        cls = lgb.LGBMClassifier if task == Task.CLASSIFICATION else lgb.LGBMRegressor
        check_params(self.name, params, set(cls().get_params()))
        return cls(**{"random_state": seed, "n_jobs": threads, "verbose": -1, "subsample_freq": 1, **params})

    def fit(self, model: Any, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, report: Report) -> Any:
        classifier = hasattr(model, "predict_proba")

        def callback(env: Any) -> None:
            done = env.iteration + 1
            if done % REPORT_EVERY == 0:
                b = env.model
                out = b.predict(X_val, num_iteration=done)
                if classifier:
                    out = np.column_stack([1 - out, out]) if out.ndim == 1 else out
                report(done // REPORT_EVERY, out)

        model.fit(X, y, callbacks=[callback])
        return model

    def export(self, model: Any, n_features: int, task: Task) -> onnx.ModelProto:
        return _convert(model, n_features, task, "lightgbm")


class XGBoost(Family):
    name = "xgboost"

    def space(self, task: Task) -> tuple[ParamSpec, ...]:
        return (ParamSpec("learning_rate", "float", low=0.01, high=0.3, log=True),
                ParamSpec("n_estimators", "int", low=50, high=400, log=True),
                ParamSpec("max_depth", "int", low=2, high=10),
                ParamSpec("min_child_weight", "float", low=0.5, high=10, log=True),
                ParamSpec("subsample", "float", low=0.5, high=1.0),
                ParamSpec("colsample_bytree", "float", low=0.5, high=1.0))

    def build(self, task: Task, params: dict[str, Any], seed: int, threads: int) -> Any:
        import xgboost as xgb

        cls = xgb.XGBClassifier if task == Task.CLASSIFICATION else xgb.XGBRegressor
        check_params(self.name, params, set(cls().get_params()))
        return cls(**{"random_state": seed, "n_jobs": threads, "tree_method": "hist", **params})

    def fit(self, model: Any, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, report: Report) -> Any:
        import xgboost as xgb

        classifier = hasattr(model, "predict_proba")
        dval = xgb.DMatrix(X_val)

        class Callback(xgb.callback.TrainingCallback):
            def after_iteration(self, booster: Any, epoch: int, evals_log: Any) -> bool:
                done = epoch + 1
                if done % REPORT_EVERY == 0:
                    out = booster.predict(dval, iteration_range=(0, done))
                    if classifier and out.ndim == 1:
                        out = np.column_stack([1 - out, out])
                    report(done // REPORT_EVERY, out)
                return False

        model.set_params(callbacks=[Callback()])
        model.fit(X, y, verbose=False)
        model.set_params(callbacks=None)
        return model

    def export(self, model: Any, n_features: int, task: Task) -> onnx.ModelProto:
        return _convert(model, n_features, task, "xgboost")
