"""AutoML's final model: a weighted ensemble of the search's best models, chosen by greedy
ensemble selection (Caruana et al., "Ensemble Selection from Libraries of Models", ICML 2004; what
auto-sklearn and AutoGluon do after their searches).

Selection works on out-of-fold outputs: each candidate's class probabilities (or predictions) on
the training rows, each row predicted by the fold model that did not see it. Starting from the
best single candidate, each round adds (with replacement) the candidate whose addition gives the
best metric for the averaged output; weights are the counts. The ensemble is kept only when it
beats the best single candidate on those rows, so AutoML never does worse than its best trial.

An ensemble is a family like any other to the runner (`EnsembleFamily`, params `{"members":
[{"family", "params", "weight"}]}`): it fits its members on the training rows, outputs their
weighted average, and exports one ONNX graph holding every member's graph (names prefixed, the
input shared) whose outputs are the weighted sum of the members' probabilities (or predictions),
and, for classifiers, the label of the most probable class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from services.training import metrics
from services.training.trainers import FAMILIES, Family, Report
from services.training.types import ParamSpec, Task

NAME = "ensemble"
ROUNDS = 20  # selection rounds: weights in steps of 1/20, as AutoGluon's default (25) about does


@dataclass(frozen=True)
class Candidate:
    family: str
    params: dict[str, Any]
    oof: np.ndarray      # out-of-fold output on the training rows (probabilities or predictions)


def select(candidates: Sequence[Candidate], metric: str, task: Task, y: np.ndarray,
           classes: np.ndarray | None, rounds: int = ROUNDS) -> list[tuple[Candidate, int]]:
    """Greedy selection with replacement: [(candidate, count)], or the best single candidate alone
    when no mixture beats it on the out-of-fold rows."""
    sign = 1.0 if metrics.MAXIMIZE[metric] else -1.0

    def value(out: np.ndarray) -> float:
        return sign * metrics.score(metric, task, y, out, classes)

    singles = [value(c.oof) for c in candidates]
    best = int(np.argmax(singles))
    counts = np.zeros(len(candidates), int)
    counts[best] = 1
    total = candidates[best].oof.astype(np.float64)
    best_value, best_counts = singles[best], counts.copy()
    for n in range(2, rounds + 1):
        scores = [value((total + c.oof) / n) for c in candidates]
        pick = int(np.argmax(scores))
        counts[pick] += 1
        total = total + candidates[pick].oof
        if scores[pick] > best_value:
            best_value, best_counts = scores[pick], counts.copy()
    return [(c, int(k)) for c, k in zip(candidates, best_counts, strict=True) if k]


class EnsembleModel:
    """Fitted members and their weights (summing to 1)."""

    def __init__(self, members: list[tuple[Family, Any, float]], task: Task) -> None:
        self.members, self.task = members, task
        if task == Task.CLASSIFICATION:
            classes = [np.asarray(m.classes_) for _f, m, _w in members]
            for c in classes[1:]:
                if not np.array_equal(c, classes[0]):
                    raise ValueError("ensemble members disagree on the classes")
            self.classes_ = classes[0]

    def output(self, X: np.ndarray) -> np.ndarray:
        return sum(w * np.asarray(f.output(m, X, self.task), dtype=np.float64).reshape(len(X), -1)
                   for f, m, w in self.members)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.output(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = self.output(X)
        return self.classes_[np.argmax(out, axis=1)] if self.task == Task.CLASSIFICATION else out.ravel()


class EnsembleFamily(Family):
    name = NAME

    def space(self, task: Task) -> tuple[ParamSpec, ...]:
        return ()

    def build(self, task: Task, params: dict[str, Any], seed: int, threads: int) -> Any:
        members = params.get("members")
        if not members or set(params) != {"members"}:
            raise ValueError("an ensemble takes exactly one parameter, 'members': [{family, params, weight}]")
        total = float(sum(m["weight"] for m in members))
        return [(FAMILIES[m["family"]], FAMILIES[m["family"]].build(task, dict(m["params"]), seed, threads),
                 m["weight"] / total) for m in members], task

    def fit(self, model: Any, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, report: Report) -> Any:
        built, task = model
        fitted = []
        for i, (fam, native, weight) in enumerate(built):
            fitted.append((fam, fam.fit(native, X, y, X_val, lambda _s, out, i=i: report(i, out)), weight))
        return EnsembleModel(fitted, task)

    def output(self, model: EnsembleModel, X: np.ndarray, task: Task) -> np.ndarray:
        out = model.output(X)
        return out if task == Task.CLASSIFICATION else out.ravel()

    def export(self, model: EnsembleModel, n_features: int, task: Task) -> onnx.ModelProto:
        return merge([(f.export(m, n_features, task), w) for f, m, w in model.members], task,
                     getattr(model, "classes_", None))

    def importances(self, model: EnsembleModel) -> np.ndarray | None:
        parts = [(f.importances(m), w) for f, m, w in model.members]
        if any(p is None for p, _w in parts):
            return None
        return sum(w * p / max(float(np.sum(p)), 1e-12) for p, w in parts)


def merge(members: list[tuple[onnx.ModelProto, float]], task: Task, classes: np.ndarray | None) -> onnx.ModelProto:
    """One graph: every member's graph with its names prefixed (`m{i}_`) and its input `input`
    shared; outputs `probabilities` = sum(weight * member probabilities) and `label` (the class of
    the largest), or `variable` = sum(weight * member prediction) [rows, 1]."""
    opsets: dict[str, int] = {}
    nodes, inits, value_info = [], [], []
    parts = []
    for i, (m, weight) in enumerate(members):
        for o in m.opset_import:
            domain = o.domain or ""
            if domain == "ai.onnx":
                domain = ""
            opsets[domain] = max(opsets.get(domain, 0), o.version)
        p = compose.add_prefix(m, f"m{i}_")
        g = p.graph
        for node in g.node:
            for k, name in enumerate(node.input):
                if name == f"m{i}_input":
                    node.input[k] = "input"
        nodes.extend(g.node)
        inits.extend(g.initializer)
        value_info.extend(g.value_info)
        out = {o.name.removeprefix(f"m{i}_"): o.name for o in g.output}
        want = "probabilities" if task == Task.CLASSIFICATION else "variable"
        if want not in out:
            raise ValueError(f"ensemble member {i} has no output {want!r} (it has {sorted(out)})")
        w = f"m{i}_ensemble_weight"
        inits.append(numpy_helper.from_array(np.array(weight, np.float32), w))
        shaped = out[want]
        if task == Task.REGRESSION:  # members give [rows] or [rows, 1]: sum as [rows, 1]
            shape = f"m{i}_ensemble_shape"
            inits.append(numpy_helper.from_array(np.array([-1, 1], np.int64), shape))
            nodes.append(helper.make_node("Reshape", [out[want], shape], [f"m{i}_ensemble_col"]))
            shaped = f"m{i}_ensemble_col"
        nodes.append(helper.make_node("Mul", [shaped, w], [f"m{i}_ensemble_weighted"]))
        parts.append(f"m{i}_ensemble_weighted")
    n_features = members[0][0].graph.input[0].type.tensor_type.shape.dim[1].dim_value
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n_features])]
    if task == Task.CLASSIFICATION:
        assert classes is not None
        nodes.append(helper.make_node("Sum", parts, ["probabilities"]))
        nodes.append(helper.make_node("ArgMax", ["probabilities"], ["ensemble_best"], axis=1, keepdims=0))
        labels = np.asarray(classes)
        label_type = TensorProto.STRING if labels.dtype.kind in "OUS" else TensorProto.INT64
        table = numpy_helper.from_array(labels.astype(object if label_type == TensorProto.STRING else np.int64),
                                        "ensemble_classes")
        inits.append(table)
        nodes.append(helper.make_node("Gather", ["ensemble_classes", "ensemble_best"], ["label"], axis=0))
        outputs = [helper.make_tensor_value_info("label", label_type, [None]),
                   helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, len(labels)])]
    else:
        nodes.append(helper.make_node("Sum", parts, ["variable"]))
        outputs = [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])]
    graph = helper.make_graph(nodes, "strata_ensemble", inputs, outputs, inits, value_info=value_info)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    merged.ir_version = max(m.ir_version for m, _w in members)
    onnx.checker.check_model(merged)
    return merged


def out_of_fold(family: str, params: dict[str, Any], task: Task, folds: Sequence[tuple[np.ndarray, ...]],
                n_rows: int, seed: int, threads: int, check: Callable[[], None]) -> np.ndarray:
    """A candidate's output on the training rows, each row predicted by the fold model that did not
    see it. `folds`: (X_fit, y_fit, X_val, y_val, val_index) per fold; `check` raises to stop."""
    fam = FAMILIES[family]
    out: np.ndarray | None = None
    for X_fit, y_fit, X_val, _y_val, index in folds:
        check()
        model = fam.fit(fam.build(task, dict(params), seed, threads), X_fit, y_fit, X_val[:1],
                        lambda _s, _o: check())
        part = np.asarray(fam.output(model, X_val, task), dtype=np.float64).reshape(len(X_val), -1)
        if out is None:
            out = np.zeros((n_rows, part.shape[1]))
        out[index] = part
    assert out is not None
    return out if task == Task.CLASSIFICATION else out.ravel()
