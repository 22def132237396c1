"""Model families by name. A new family is one module with a `Family` subclass, added here."""

from __future__ import annotations

from services.training.trainers.base import Family, Report
from services.training.trainers.boosting import LightGBM, XGBoost
from services.training.trainers.sklearn_models import HistGradientBoosting, Linear, RandomForest
from services.training.trainers.torch_mlp import MLP

FAMILIES: dict[str, Family] = {f.name: f for f in (Linear(), RandomForest(), HistGradientBoosting(),
                                                   LightGBM(), XGBoost(), MLP())}



def preload() -> None:
    """Import the libraries the families load on first use (torch, LightGBM, XGBoost: seconds
    together), so that a worker pays it once at start, not inside a job's time budget."""
    import lightgbm  # noqa: F401
    import torch  # noqa: F401
    import xgboost  # noqa: F401


__all__ = ["FAMILIES", "Family", "Report", "preload"]
