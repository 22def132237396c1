"""`mlp`: a PyTorch multi-layer perceptron (ReLU hidden layers, Adam, mini-batches), exported
with torch.onnx. The standardisation of the inputs (the training rows' mean and spread) is a
layer of the network, so the exported model takes raw columns as every other family does. One
intermediate report per epoch feeds the pruner. Classifiers end in a softmax, and their ONNX
graph gives `label` (the class label, not its index) and `probabilities`, as skl2onnx's do."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import onnx

from services.training.trainers.base import Family, Report, check_params
from services.training.types import ParamSpec, Task

DEFAULTS: dict[str, Any] = {"hidden_layers": 2, "hidden_units": 64, "learning_rate": 1e-3, "epochs": 30,
                            "batch_size": 128, "weight_decay": 0.0, "dropout": 0.0}


class MLPModel:
    """The fitted network with what predicting needs (the scikit-learn calls the runner makes)."""

    def __init__(self, net: Any, task: Task, classes: np.ndarray | None) -> None:
        self.net, self.task, self.classes_ = net, task, classes

    def _forward(self, X: np.ndarray) -> np.ndarray:
        import torch

        self.net.eval()
        with torch.no_grad():
            return self.net(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self._forward(X).astype(np.float64)

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = self._forward(X)
        return self.classes_[np.argmax(out, axis=1)] if self.task == Task.CLASSIFICATION else out.ravel()


class MLP(Family):
    name = "mlp"

    def space(self, task: Task) -> tuple[ParamSpec, ...]:
        return (ParamSpec("hidden_layers", "int", low=1, high=3),
                ParamSpec("hidden_units", "int", low=16, high=256, log=True),
                ParamSpec("learning_rate", "float", low=1e-4, high=1e-2, log=True),
                ParamSpec("weight_decay", "float", low=1e-6, high=1e-2, log=True),
                ParamSpec("dropout", "float", low=0.0, high=0.3))

    def build(self, task: Task, params: dict[str, Any], seed: int, threads: int) -> dict[str, Any]:
        check_params(self.name, params, set(DEFAULTS))
        p = {**DEFAULTS, **params}
        for key in ("hidden_layers", "hidden_units", "epochs", "batch_size"):
            if int(p[key]) != p[key] or int(p[key]) < (0 if key == "hidden_layers" else 1):
                raise ValueError(f"mlp: {key} must be a positive integer, got {p[key]!r}")
        return {**p, "task": task, "seed": seed, "threads": threads}

    def fit(self, model: dict[str, Any], X: np.ndarray, y: np.ndarray, X_val: np.ndarray, report: Report) -> MLPModel:
        import torch
        from torch import nn

        torch.manual_seed(model["seed"])
        torch.set_num_threads(max(1, model["threads"]))
        task = model["task"]
        X = np.ascontiguousarray(X, dtype=np.float32)
        mean = X.mean(axis=0)
        std = X.std(axis=0)
        std[std == 0] = 1.0
        classes = np.unique(y) if task == Task.CLASSIFICATION else None
        outputs = len(classes) if classes is not None else 1
        layers: list[nn.Module] = [_Standardize(mean, std)]
        width = X.shape[1]
        for _ in range(int(model["hidden_layers"])):
            layers += [nn.Linear(width, int(model["hidden_units"])), nn.ReLU()]
            if model["dropout"]:
                layers.append(nn.Dropout(float(model["dropout"])))
            width = int(model["hidden_units"])
        layers.append(nn.Linear(width, outputs))
        if task == Task.CLASSIFICATION:
            layers.append(nn.Softmax(dim=1))
        net = nn.Sequential(*layers)
        target = torch.from_numpy(np.searchsorted(classes, y).astype(np.int64)) if classes is not None \
            else torch.from_numpy(np.asarray(y, dtype=np.float32).reshape(-1, 1))
        scale = (float(np.std(y)) or 1.0) if classes is None else 1.0  # regression loss on the target's scale
        loss_fn = (lambda out, t: nn.functional.nll_loss(torch.log(out.clamp_min(1e-12)), t)) \
            if classes is not None else (lambda out, t: nn.functional.mse_loss(out / scale, t / scale))
        opt = torch.optim.Adam(net.parameters(), lr=float(model["learning_rate"]),
                               weight_decay=float(model["weight_decay"]))
        data = torch.from_numpy(X)
        batch = int(model["batch_size"])
        fitted = MLPModel(net, task, classes)
        gen = torch.Generator().manual_seed(model["seed"])
        for epoch in range(1, int(model["epochs"]) + 1):
            net.train()
            order = torch.randperm(len(data), generator=gen)
            for start in range(0, len(data), batch):
                idx = order[start:start + batch]
                opt.zero_grad()
                loss = loss_fn(net(data[idx]), target[idx])
                loss.backward()
                opt.step()
            report(epoch, fitted.predict_proba(X_val) if task == Task.CLASSIFICATION else fitted.predict(X_val))
        return fitted

    def output(self, model: MLPModel, X: np.ndarray, task: Task) -> np.ndarray:
        return model.predict_proba(X) if task == Task.CLASSIFICATION else model.predict(X)

    def export(self, model: MLPModel, n_features: int, task: Task) -> onnx.ModelProto:
        import torch

        wrapper = _Labelled(model.net, model.classes_) if task == Task.CLASSIFICATION else model.net
        wrapper.eval()
        buf = io.BytesIO()
        names = ["label", "probabilities"] if task == Task.CLASSIFICATION else ["variable"]
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice: it is the one that
            warnings.simplefilter("ignore")  # needs no onnxscript, and exports this network exactly
            torch.onnx.export(wrapper, (torch.zeros(1, n_features),), buf, input_names=["input"],
                              output_names=names, dynamic_axes={"input": {0: "rows"}, **{n: {0: "rows"} for n in names}},
                              opset_version=17, dynamo=False)
        return onnx.load_from_string(buf.getvalue())

    def importances(self, model: Any) -> np.ndarray | None:
        return None


def _define_modules() -> None:
    """The network's own layers, defined on first use (torch loads only when this family is used)
    as module-level names, so a fitted model pickles (the run's native_model.joblib)."""
    if "Standardize" in globals():
        return
    import torch
    from torch import nn

    class Standardize(nn.Module):
        def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
            super().__init__()
            self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
            self.register_buffer("std", torch.from_numpy(std.astype(np.float32)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x - self.mean) / self.std

    class Labelled(nn.Module):
        """The classifier with its label output: the class label of the largest probability."""

        def __init__(self, net: nn.Module, classes: np.ndarray) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("classes", torch.from_numpy(np.asarray(classes).astype(np.int64)))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probs = self.net(x)
            return self.classes[torch.argmax(probs, dim=1)], probs

    for cls in (Standardize, Labelled):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls


def __getattr__(name: str) -> Any:  # unpickling looks the layers up here before any fit defined them
    if name in ("Standardize", "Labelled"):
        _define_modules()
        return globals()[name]
    raise AttributeError(name)


def _Standardize(mean: np.ndarray, std: np.ndarray) -> Any:
    _define_modules()
    return globals()["Standardize"](mean, std)


def _Labelled(net: Any, classes: np.ndarray) -> Any:
    _define_modules()
    return globals()["Labelled"](net, classes)
