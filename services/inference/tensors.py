"""Request inputs as plain values, and their decoding into numpy feeds without per-element Python
for raw bytes. The servicers' converters (codec.py, v2.py) put what the wire carried into
`InputTensor`s, by reference; the data plane decodes them once the model that will run them is
known. Raw bytes are little-endian; BYTES elements are 4-byte little-endian length prefixed, as
Triton serializes them.

Two decodings, as the two protocols define their inputs: `decode_tensors` (Strata Predict: a dtype
may be left to the model, the value lists are JSON-friendly) and `decode_v2_inputs` (KServe V2:
a datatype on every input, raw contents for all inputs or none); `decode_rows` for Predict's rows.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument, quote
from services.inference.runtime import NUMPY_TO_V2, V2_TO_NUMPY, TensorInfo

_FLOAT32 = np.dtype(np.float32)
_OBJECT = np.dtype(object)


@dataclass(slots=True)
class InputTensor:
    """One input as the request carried it. `datatype`: a V2 name ("FP32"); "" (Predict only):
    the model's; anything else is refused naming it. `raw`: the input's bytes (not copied), or
    None when it came as `values` (the wire's typed list, not copied; None: the protocol has no
    value list for the datatype). `conflict`: the wire fields, when the data came in more than
    one (refused in its turn among the input's checks)."""

    name: str
    datatype: str
    shape: Sequence[int]
    raw: bytes | None = None
    values: Sequence | None = None
    conflict: str = ""


def shape_of(field: str, dims: Sequence[int]) -> tuple[int, ...]:
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
    if dtype == _OBJECT:
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


# -- Strata Predict ----------------------------------------------------------------------------------
def decode_tensors(inputs: Sequence[InputTensor], specs: Mapping[str, TensorInfo]) -> dict[str, np.ndarray]:
    """Predict's tensors; an input without a datatype takes the model's (`specs`), float32 for an
    input the model does not have (refused afterwards by the signature check, naming it)."""
    feeds: dict[str, np.ndarray] = {}
    for i, t in enumerate(inputs):
        field = f"inputs[{i}]"
        name = t.name
        if not name:
            raise InvalidArgument(f"{field}.name", "input name is required")
        if name in feeds:
            raise InvalidArgument(f"{field}.name", f"input {quote(name)} is given twice")
        if t.datatype:
            dtype = V2_TO_NUMPY.get(t.datatype)
            if dtype is None:
                raise InvalidArgument(f"{field}.dtype", f"input {quote(name)}: unsupported dtype {t.datatype}")
        else:
            spec = specs.get(name)
            dtype = spec.dtype if spec else _FLOAT32
        shape = shape_of(f"{field}.shape", t.shape)
        if t.conflict:
            raise InvalidArgument(field, f"input {quote(name)} sets {t.conflict}; use one")
        if t.raw is not None:
            feeds[name] = from_raw(field, name, t.raw, dtype, shape)
            continue
        values = t.values if t.values is not None else ()
        if len(values) != count(shape):
            raise InvalidArgument(field, f"input {quote(name)}: {len(values)} values, shape "
                                  f"{quote(list(shape))} needs {count(shape)}")
        try:
            arr = np.array(values, dtype=dtype)
        except (TypeError, ValueError, OverflowError) as e:
            raise InvalidArgument(field, f"input {quote(name)}: values do not fit {dtype}: "
                                  f"{quote(str(e), bare=True)}") from None
        feeds[name] = reshape(field, name, arr, shape)
    return feeds


def decode_rows(rows: Sequence[Mapping[str, object]], specs: Mapping[str, TensorInfo]) -> dict[str, np.ndarray]:
    """Rows of {input name: value}: each input becomes the stack of its per-row values."""
    feeds: dict[str, np.ndarray] = {}
    for i, row in enumerate(rows):
        unknown = set(row) - specs.keys()
        if unknown:
            name = sorted(unknown)[0]
            raise InvalidArgument(f"rows[{i}].{quote(name, bare=True)}", f"unknown input {quote(name)}; the "
                                  "model's inputs are "
                                  + ", ".join(repr(n) for n in specs))
    for name, spec in specs.items():
        values = []
        for i, row in enumerate(rows):
            if name not in row:
                raise InvalidArgument(f"rows[{i}].{name}", f"row {i} has no value for input '{name}'")
            values.append(row[name])
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


# -- KServe V2 -------------------------------------------------------------------------------------------
def decode_v2_inputs(inputs: Sequence[InputTensor], raw_count: int) -> dict[str, np.ndarray]:
    """ModelInfer's inputs. `raw_count`: how many raw contents the request carried (0: the inputs
    came as typed contents); with any, there must be one per input."""
    if raw_count and raw_count != len(inputs):
        raise InvalidArgument("raw_input_contents", f"{raw_count} raw contents for {len(inputs)} inputs; "
                              "give one per input, in the order of 'inputs'")
    feeds: dict[str, np.ndarray] = {}
    for t in inputs:
        name = t.name
        field = f"inputs[{quote(name, bare=True)}]"
        dtype = V2_TO_NUMPY.get(t.datatype)
        if dtype is None:
            raise InvalidArgument(field, f"input {quote(name)}: unknown datatype {quote(t.datatype)}")
        if name in feeds:
            raise InvalidArgument(field, f"input {quote(name)} is given twice")
        shape = shape_of(field, t.shape)
        if t.raw is not None:
            if t.conflict:
                raise InvalidArgument(field, f"input {quote(name)}: contents and raw_input_contents are both set")
            feeds[name] = from_raw(field, name, t.raw, dtype, shape)
            continue
        values = t.values
        if values is None:
            raise InvalidArgument(field, f"input {quote(name)}: {t.datatype} travels only in raw_input_contents")
        if len(values) != count(shape):
            raise InvalidArgument(field, f"input {quote(name)}: {len(values)} values, shape "
                                  f"{quote(list(shape))} needs {count(shape)}")
        if dtype == _OBJECT:
            arr = np.array([v.decode("utf-8", "replace") for v in values], dtype=object)
        else:
            arr = np.array(values, dtype=dtype)
        feeds[name] = reshape(field, name, arr, shape)
    return feeds
