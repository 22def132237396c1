"""Tensors between the wire and numpy, without per-element Python for raw bytes.

Strata Predict: Tensor.raw, typed value lists (JSON-friendly), or rows of named values; the
shared raw-bytes helpers serve the V2 protocol too (services/inference/v2.py), where BYTES
elements are 4-byte little-endian length prefixed, as Triton serializes them.
"""

from __future__ import annotations

import struct

import numpy as np
from google.protobuf import struct_pb2
from strata.common.v1 import types_pb2
from strata.inference.v1 import inference_pb2 as pb

from services.common.errors import InvalidArgument, quote
from services.inference.runtime import NUMPY_TO_V2, TensorInfo

_DT = types_pb2.DataType
STRATA_TO_NUMPY: dict[int, np.dtype] = {
    _DT.DATA_TYPE_FLOAT32: np.dtype(np.float32), _DT.DATA_TYPE_FLOAT64: np.dtype(np.float64),
    _DT.DATA_TYPE_FLOAT16: np.dtype(np.float16), _DT.DATA_TYPE_INT8: np.dtype(np.int8),
    _DT.DATA_TYPE_INT16: np.dtype(np.int16), _DT.DATA_TYPE_INT32: np.dtype(np.int32),
    _DT.DATA_TYPE_INT64: np.dtype(np.int64), _DT.DATA_TYPE_UINT8: np.dtype(np.uint8),
    _DT.DATA_TYPE_UINT16: np.dtype(np.uint16), _DT.DATA_TYPE_UINT32: np.dtype(np.uint32),
    _DT.DATA_TYPE_UINT64: np.dtype(np.uint64), _DT.DATA_TYPE_BOOL: np.dtype(np.bool_),
    _DT.DATA_TYPE_STRING: np.dtype(object),
}
NUMPY_TO_STRATA = {v: k for k, v in STRATA_TO_NUMPY.items()}

def shape_of(field: str, dims) -> tuple[int, ...]:  # noqa: ANN001
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise InvalidArgument(field, f"shape {quote(list(shape))} has a negative dimension")
    return shape


def reshape(field: str, name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`arr` in `shape`; a shape numpy cannot hold (over 64 dimensions, a size past the address
    space even with no elements) is INVALID_ARGUMENT, not an internal error."""
    try:
        return arr.reshape(shape)
    except ValueError as e:
        raise InvalidArgument(field, f"input {quote(name)}: shape {quote(list(shape))} cannot be held: "
                              f"{quote(str(e), bare=True)}") from None


def count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def from_raw(field: str, name: str, raw: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.dtype(object):
        return _deserialize_bytes(field, name, raw, shape)
    want = count(shape) * dtype.itemsize
    if len(raw) != want:
        raise InvalidArgument(field, f"input {quote(name)}: {len(raw)} bytes of data, shape {quote(list(shape))} "
                              f"of {NUMPY_TO_V2.get(dtype, dtype)} needs {want}")
    return reshape(field, name, np.frombuffer(raw, dtype=_little_endian(dtype)), shape)


_LE: dict[np.dtype, np.dtype] = {}


def _little_endian(dtype: np.dtype) -> np.dtype:
    """The wire is little-endian; on x86/ARM hosts this is the dtype itself (cached lookup)."""
    le = _LE.get(dtype)
    if le is None:
        le = _LE[dtype] = dtype.newbyteorder("<")
    return le


def _deserialize_bytes(field: str, name: str, raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidArgument(field, f"input {quote(name)}: truncated BYTES element")
        (n,) = struct.unpack_from("<I", raw, pos)
        items.append(raw[pos + 4:pos + 4 + n].decode("utf-8", "replace"))
        pos += 4 + n
    if len(items) != count(shape):
        raise InvalidArgument(field, f"input {quote(name)}: {len(items)} BYTES elements, shape "
                              f"{quote(list(shape))} needs {count(shape)}")
    return reshape(field, name, np.array(items, dtype=object), shape)


def serialize_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


# -- Strata Predict --------------------------------------------------------------------------
def tensor_inputs(tensors, specs: dict[str, TensorInfo]) -> tuple[dict[str, np.ndarray], bool]:  # noqa: ANN001
    """Returns the feeds and whether the request used raw bytes (the reply mirrors it)."""
    feeds: dict[str, np.ndarray] = {}
    raw_used = False
    for i, t in enumerate(tensors):
        field = f"inputs[{i}]"
        if not t.name:
            raise InvalidArgument(f"{field}.name", "input name is required")
        if t.name in feeds:
            raise InvalidArgument(f"{field}.name", f"input {quote(t.name)} is given twice")
        spec = specs.get(t.name)
        if t.dtype:
            dtype = STRATA_TO_NUMPY.get(t.dtype)
            if dtype is None:
                raise InvalidArgument(f"{field}.dtype", f"input {quote(t.name)}: unsupported dtype {t.dtype}")
        else:
            dtype = spec.dtype if spec else np.dtype(np.float32)
        shape = shape_of(f"{field}.shape", t.shape)
        sources = [n for n in ("raw", "float_values", "int_values", "bool_values", "string_values")
                   if (t.raw if n == "raw" else len(getattr(t, n)))]
        if len(sources) > 1:
            raise InvalidArgument(field, f"input {quote(t.name)} sets {' and '.join(sources)}; use one")
        if sources == ["raw"]:
            raw_used = True
            feeds[t.name] = from_raw(field, t.name, t.raw, dtype, shape)
            continue
        values = getattr(t, sources[0]) if sources else []
        if len(values) != count(shape):
            raise InvalidArgument(field, f"input {quote(t.name)}: {len(values)} values, shape "
                                  f"{quote(list(shape))} needs {count(shape)}")
        try:
            arr = np.array(values, dtype=dtype)
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidArgument(field, f"input {quote(t.name)}: values do not fit {dtype}: "
                                  f"{quote(str(e), bare=True)}") from None
        feeds[t.name] = reshape(field, t.name, arr, shape)
    return feeds, raw_used


def row_inputs(rows, specs: dict[str, TensorInfo]) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Rows of {input name: value}: each input becomes the stack of its per-row values."""
    feeds: dict[str, np.ndarray] = {}
    for i, row in enumerate(rows):
        unknown = set(row.fields) - specs.keys()
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidArgument(f"rows[{i}].{quote(name, bare=True)}", f"unknown input {quote(name)}; the "
                                  "model's inputs are "
                                  + ", ".join(repr(n) for n in specs))
    for name, spec in specs.items():
        values = []
        for i, row in enumerate(rows):
            if name not in row.fields:
                raise InvalidArgument(f"rows[{i}].{name}", f"row {i} has no value for input '{name}'")
            values.append(_plain(row.fields[name]))
        try:
            arr = np.array(values, dtype=spec.dtype)
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidArgument(f"rows.{name}", f"input '{name}': values do not fit "
                                  f"{NUMPY_TO_V2.get(spec.dtype, spec.dtype)}: {quote(str(e), bare=True)}") from None
        # A model input [batch, 1] takes scalars per row.
        if arr.ndim == len(spec.shape) - 1 and spec.shape and spec.shape[-1] == 1:
            arr = arr.reshape(*arr.shape, 1)
        feeds[name] = arr
    return feeds


def _plain(v: struct_pb2.Value) -> object:
    kind = v.WhichOneof("kind")
    if kind == "list_value":
        return [_plain(x) for x in v.list_value.values]
    if kind == "null_value":
        return float("nan")
    return getattr(v, kind)


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
