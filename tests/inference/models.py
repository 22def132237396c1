"""Small ONNX models built by the tests and benchmarks (no training framework needed)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes: list, inputs: list, outputs: list, inits: list) -> bytes:
    graph = helper.make_graph(nodes, "m", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m.SerializeToString()


def mlp(sizes: tuple[int, ...] = (32, 256, 256, 2), seed: int = 0, input_name: str = "input",
        output_name: str = "output") -> bytes:
    """A tabular MLP (Gemm + Relu layers) with random weights; `seed` makes versions differ."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], input_name
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    for i, (a, b) in enumerate(layers):
        inits += [numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array(rng.standard_normal(b).astype(np.float32) * 0.1, f"B{i}")]
        last = i == len(layers) - 1
        gemm_out = output_name if last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"B{i}"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"h{i}"]))
            prev = f"h{i}"
    return _model(nodes, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", sizes[0]])],
                  [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", sizes[-1]])], inits)


def slow(features: int = 32, width: int = 1024, depth: int = 24, seed: int = 0) -> bytes:
    """Same interface as mlp(features -> 2) but many wide layers: milliseconds per call."""
    return mlp((features, *([width] * depth), 2), seed=seed)


def fails_when_large(features: int = 32, seed: int = 0) -> bytes:
    """Same interface as mlp(features -> 2); raises at run time when input[:, 0] >= 10
    (a Gather index out of range): a version that breaks on some traffic."""
    rng = np.random.default_rng(seed)
    table = numpy_helper.from_array(rng.standard_normal((10, 2)).astype(np.float32), "table")
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([1], np.int64), "ends")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["first"]),      # [N, 1]
        helper.make_node("Squeeze", ["first", "axes"], ["first1"]),                     # [N]
        helper.make_node("Cast", ["first1"], ["idx"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "idx"], ["output"], axis=0),              # [N, 2]
    ]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 2])],
                  [table, starts, ends, axes])


def fixed_batch(features: int = 4) -> bytes:
    """Input [1, features] with a fixed batch dimension: not batchable."""
    w = numpy_helper.from_array(np.eye(features, 2, dtype=np.float32), "W")
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])


def log(features: int = 4) -> bytes:
    """y = log(x) element-wise, [batch, features] -> [batch, features]: finite inputs give
    non-finite outputs (log(0) = -inf, log(-1) = NaN)."""
    return _model([helper.make_node("Log", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])], [])


def columns_linear(columns: list[str], weights: list[float], bias: float = 0.0) -> bytes:
    """A model with one [batch, 1] float input per column (as the training service exports them,
    one per training-set column), scoring `bias + sum(w * x)` into `score` [batch, 1]."""
    inits = [numpy_helper.from_array(np.array(weights, np.float32).reshape(-1, 1), "W"),
             numpy_helper.from_array(np.array([bias], np.float32), "B")]
    nodes = [helper.make_node("Concat", columns, ["x"], axis=1), helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Add", ["xw", "B"], ["score"])]
    return _model(nodes, [helper.make_tensor_value_info(c, TensorProto.FLOAT, ["batch", 1]) for c in columns],
                  [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])], inits)
