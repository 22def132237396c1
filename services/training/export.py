"""ONNX export and its parity check.

A family exports its native model with one input `input` [rows, features]; `with_column_inputs`
puts one input per training column ([rows, 1] float, named as the column) in front of it, joined
by a Concat node, so the registered model's signature is the training set's columns: inference's
Predict takes rows of {column: value} and V2 clients send one tensor per feature. The column
order, the task and the class labels are kept in the model's metadata (`strata.*`).

Parity runs the exported model with onnxruntime on the held-out rows and compares it with the
native model: the largest absolute difference of the probabilities (classifiers) or predictions
(regressors) must stay under the tolerance times the outputs' scale (max(1, largest |output|)), and
classifiers must give the same labels (except on rows where the native model's two best classes
tie within the tolerance)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from services.training.trainers import Family
from services.training.types import Parity, Task

_INNER = "strata__features"


def with_column_inputs(model: onnx.ModelProto, columns: list[str], task: Task,
                       classes: np.ndarray | None) -> onnx.ModelProto:
    g = model.graph
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):  # onnxmltools' XGBoost omits it
        model.opset_import.append(helper.make_opsetid("", 15))
    inner = g.input[0].name
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == inner:
                node.input[i] = _INNER
    del g.input[:]
    g.input.extend([helper.make_tensor_value_info(c, TensorProto.FLOAT, [None, 1]) for c in columns])
    g.node.insert(0, helper.make_node("Concat", list(columns), [_INNER], axis=1, name="strata_columns"))
    meta = {"strata.columns": json.dumps(columns), "strata.task": task.name.lower()}
    if classes is not None:
        meta["strata.classes"] = json.dumps([c.item() if hasattr(c, "item") else c for c in classes])
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.checker.check_model(model)
    return model


def session(data: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, X: np.ndarray, columns: list[str]) -> dict[str, np.ndarray]:
    """One [rows, 1] float32 feed per model input, taken from the column of the same name;
    KeyError naming the inputs the rows lack."""
    index = {c: i for i, c in enumerate(columns)}
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in index]
    if missing:
        raise KeyError(f"the model takes input(s) {missing[:10]} that the dataset has no column for")
    return {n: np.ascontiguousarray(X[:, index[n]:index[n] + 1], dtype=np.float32) for n in names}


def onnx_output(sess: ort.InferenceSession, X: np.ndarray, columns: list[str], task: Task) -> np.ndarray:
    """What metrics.score reads: class probabilities (classifiers) or predictions (regressors)."""
    return _scored(sess.run(None, feeds(sess, X, columns)), task)


def _scored(outs: list, task: Task) -> np.ndarray:
    """The probabilities (classifiers) or predictions (regressors) among a run's outputs."""
    if task == Task.CLASSIFICATION:
        probs = outs[1]
        if isinstance(probs, list):  # a ZipMap output (a model exported elsewhere): list of {class: p}
            keys = sorted(probs[0])
            probs = np.array([[row[k] for k in keys] for row in probs])
        return np.asarray(probs, dtype=np.float64)
    return np.asarray(outs[0], dtype=np.float64).ravel()


def model_classes(sess: ort.InferenceSession) -> np.ndarray | None:
    meta = sess.get_modelmeta().custom_metadata_map
    return np.array(json.loads(meta["strata.classes"])) if "strata.classes" in meta else None


def check_parity(data: bytes, family: Family, model: Any, X: np.ndarray, columns: list[str], task: Task,
                 tolerance: float) -> Parity:
    sess = session(data)
    outs = sess.run(None, feeds(sess, X, columns))  # once: labels and probabilities together
    exported = _scored(outs, task)
    native = np.asarray(family.output(model, X, task), dtype=np.float64)
    if task == Task.REGRESSION:
        native = native.ravel()
    # Relative to the outputs' scale (at least 1): trees compare thresholds in float32, which moves a
    # regression target of magnitude 300 by ~1e-4 while probabilities move by ~1e-7.
    scale = max(1.0, float(np.max(np.abs(native)))) if len(X) else 1.0
    diff = float(np.max(np.abs(exported - native))) if len(X) else 0.0
    agreement, clear_disagreements = 1.0, 0
    if task == Task.CLASSIFICATION and len(X):
        differ = np.asarray(outs[0]).ravel() != np.asarray(model.predict(X)).ravel()
        agreement = float(1 - np.mean(differ))
        # A row whose two best classes tie (a forest's 0.5 / 0.5) may go either way in either
        # runtime: only a disagreement where the native model had a clear winner fails parity.
        top2 = np.sort(native, axis=1)[:, -2:]
        clear_disagreements = int(np.sum(differ & (top2[:, 1] - top2[:, 0] > tolerance)))
    return Parity(max_abs_diff=diff, tolerance=tolerance, label_agreement=agreement, rows=len(X),
                  passed=diff <= tolerance * scale and clear_disagreements == 0)
