"""Strata Predict's tensors and rows between the wire and the data plane: requests into plain
`InputTensor`s and rows (services/inference/tensors.py decodes them into numpy), numpy outputs
into Tensor messages (raw bytes or JSON-friendly value lists) and rows, without per-element
Python for raw bytes. The V2 protocol's tensors are converted in services/inference/v2.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf import struct_pb2
from strata.common.v1 import types_pb2
from strata.inference.v1 import inference_pb2 as pb

from services.common.convert import NUMERIC_DATA_TYPES
from services.inference.runtime import NUMPY_TO_V2
from services.inference.tensors import InputTensor

_DT = types_pb2.DataType
STRATA_TO_NUMPY: dict[int, np.dtype] = {**NUMERIC_DATA_TYPES, _DT.DATA_TYPE_STRING: np.dtype(object)}
NUMPY_TO_STRATA = {v: k for k, v in STRATA_TO_NUMPY.items()}
# Strata DataType -> the data plane's datatype names (V2's); an unknown number travels as its
# digits, which the data plane refuses by name ("unsupported dtype 99").
_DATATYPES = {code: NUMPY_TO_V2[dtype] for code, dtype in STRATA_TO_NUMPY.items()}


# -- requests ------------------------------------------------------------------------------------
def input_tensors(tensors: Sequence[pb.Tensor]) -> tuple[list[InputTensor], bool]:
    """The inputs, by reference, and whether the request used raw bytes (the reply mirrors it)."""
    out = []
    raw_used = False
    for t in tensors:
        raw = t.raw or None
        code = t.dtype
        f, n, b, s = t.float_values, t.int_values, t.bool_values, t.string_values
        conflict = ""
        if (raw is not None) + bool(f) + bool(n) + bool(b) + bool(s) > 1:
            conflict = " and ".join(k for k, v in (("raw", raw), ("float_values", f), ("int_values", n),
                                                   ("bool_values", b), ("string_values", s)) if v)
        if raw is not None:
            raw_used = True
        out.append(InputTensor(t.name, (_DATATYPES.get(code) or str(code)) if code else "", t.shape, raw,
                               f or n or b or s, conflict))
    return out, raw_used


def plain_rows(rows: Sequence[struct_pb2.Struct]) -> list[dict[str, object]]:
    """Each row as {input name: number, string, bool or list}; null is NaN."""
    return [{k: _plain(v) for k, v in row.fields.items()} for row in rows]


def _plain(v: struct_pb2.Value) -> object:
    kind = v.WhichOneof("kind")
    if kind == "list_value":
        return [_plain(x) for x in v.list_value.values]
    if kind == "null_value" or kind is None:  # a Value with no kind (gRPC only; JSON has none) reads as null
        return float("nan")
    return getattr(v, kind)


# -- responses -----------------------------------------------------------------------------------
def to_raw_tensor(name: str, arr: np.ndarray) -> pb.Tensor:
    if arr.dtype == np.dtype(object):
        return pb.Tensor(name=name, dtype=_DT.DATA_TYPE_STRING, shape=arr.shape,
                         string_values=[str(x) for x in arr.reshape(-1)])
    return pb.Tensor(name=name, dtype=NUMPY_TO_STRATA.get(arr.dtype, 0), shape=arr.shape,
                     raw=np.ascontiguousarray(arr).tobytes())


def to_value_tensor(name: str, arr: np.ndarray) -> pb.Tensor:
    t = pb.Tensor(name=name, dtype=NUMPY_TO_STRATA.get(arr.dtype, 0), shape=arr.shape)
    flat = arr.reshape(-1)
    if arr.dtype.kind == "f":
        t.float_values.extend(flat.astype(np.float64).tolist())
    elif arr.dtype.kind in "iu":
        t.int_values.extend(flat.astype(np.int64).tolist())
    elif arr.dtype.kind == "b":
        t.bool_values.extend(flat.tolist())
    else:
        t.string_values.extend(str(x) for x in flat)
    return t


def json_safe(arr: np.ndarray) -> np.ndarray:
    """A float output with NaN and infinities written as proto3 JSON writes them in a double
    field ("NaN", "Infinity", "-Infinity"). Rows are google.protobuf.Struct, whose numbers are
    JSON numbers: JSON has no NaN, and the gateway's transcoder refused a response holding one
    (a 502). Finite outputs (the usual case) come back as they are, after one vectorised test."""
    if arr.dtype.kind != "f" or np.logical_and.reduce(np.isfinite(arr), axis=None):
        return arr
    out = arr.astype(object)
    out[np.isnan(arr)] = "NaN"
    out[np.isposinf(arr)] = "Infinity"
    out[np.isneginf(arr)] = "-Infinity"
    return out


def to_rows(outputs: list[tuple[str, np.ndarray]]) -> list[struct_pb2.Struct]:
    rows = []
    n = outputs[0][1].shape[0] if outputs and outputs[0][1].ndim else 0
    outputs = [(name, json_safe(arr)) for name, arr in outputs]
    for i in range(n):
        s = struct_pb2.Struct()
        for name, arr in outputs:
            v = arr[i]
            s.update({name: v.tolist() if isinstance(v, np.ndarray) else v.item() if hasattr(v, "item") else v})
        rows.append(s)
    return rows
