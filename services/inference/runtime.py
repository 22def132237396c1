"""One model version in ONNX Runtime: session options chosen for the machine, the signature
read from the session, input checks with messages that name the input, warm-up.

The hot path is numpy over the request's bytes: `np.frombuffer` views, no per-element Python.
On CUDA the inputs and outputs go through an IO binding (one host->device copy per input and
one device->host copy per output per batch), as ONNX Runtime's CUDA guide recommends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from services.common.errors import InvalidArgument, quote

# ONNX Runtime's type strings -> numpy.
_ORT_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16), "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16), "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64), "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16), "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64), "tensor(bool)": np.dtype(np.bool_),
    "tensor(string)": np.dtype(object),
}

# KServe V2 datatype names <-> numpy (BYTES carries strings).
V2_TO_NUMPY: dict[str, np.dtype] = {
    "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64), "FP16": np.dtype(np.float16),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "BOOL": np.dtype(np.bool_),
    "BYTES": np.dtype(object),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}
_ALL, _ISFINITE = np.logical_and.reduce, np.isfinite  # called directly: no method lookups per request


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    #: -1 for a dynamic dimension.
    shape: tuple[int, ...]

    @property
    def v2_datatype(self) -> str:
        return NUMPY_TO_V2[self.dtype]


def _info(arg: ort.NodeArg) -> TensorInfo:
    dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorInfo(arg.name, _ORT_TYPES.get(arg.type, np.dtype(object)), dims)


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Several serving processes share the cores: one intra-op thread each unless told otherwise,
    # so processes do not fight over the same cores (and spinning threads do not steal them).
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


class ModelRuntime:
    """An ONNX Runtime session for one model version. `run` is called by one thread at a time
    (the model's batcher), which CUDA graphs and IO binding need."""

    def __init__(self, path: Path, *, intra_op_threads: int = 1, device: str = "auto",
                 max_batch_size: int = 1024, allow_nan: bool = False) -> None:
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and cuda_available():
            providers = [("CUDAExecutionProvider", {
                "arena_extend_strategy": "kSameAsRequested",  # predictable with many models
                "cudnn_conv_algo_search": "HEURISTIC",
            }), "CPUExecutionProvider"]
        elif device == "cuda":
            raise RuntimeError("STRATA_INFERENCE_DEVICE=cuda but onnxruntime has no CUDA execution provider")
        self.session = ort.InferenceSession(str(path), session_options(intra_op_threads), providers=providers)
        self.provider = self.session.get_providers()[0]
        self.inputs = [_info(a) for a in self.session.get_inputs()]
        self.outputs = [_info(a) for a in self.session.get_outputs()]
        self._by_name = {i.name: i for i in self.inputs}
        #: The registry's signature says the model takes NaN and infinities; otherwise the float
        #: inputs are checked on every request (`_refuse_non_finite`).
        self.allow_nan = allow_nan
        self._finite_inputs = () if allow_nan else tuple(i.name for i in self.inputs if i.dtype.kind == "f")
        self.output_names = [o.name for o in self.outputs]
        # Batching across requests needs a dynamic leading dimension on every input and output.
        batchable = all(i.shape and i.shape[0] == -1 for i in self.inputs + self.outputs)
        self.max_batch_size = max_batch_size if batchable else 0
        self._cuda = self.provider == "CUDAExecutionProvider"
        self.memory_bytes = path.stat().st_size * 2  # weights + runtime copies, a fair estimate
        self.batch_seconds = 0.0  # measured by warm_up
        self._valid_layouts: set[tuple] = set()
        sess = getattr(self.session, "_sess", None)  # onnxruntime is pinned; fall back if it moves
        self._run = sess.run if sess is not None else self.session.run

    # -- checks ------------------------------------------------------------------------------
    def check(self, feeds: dict[str, np.ndarray]) -> int:
        """Validate the inputs against the signature; return the batch size (rows). Requests of
        a layout seen before (names, dtypes, non-batch dims) skip straight to the row count and,
        unless the signature allows NaN, the test that float inputs are finite."""
        if self.max_batch_size and len(feeds) == len(self.inputs):
            layout = tuple((n, a.dtype, a.shape[1:]) for n, a in feeds.items())
            if layout in self._valid_layouts:
                rows = {a.shape[0] for a in feeds.values()}
                if len(rows) == 1 and (n := rows.pop()) <= self.max_batch_size:
                    if self._finite_inputs:
                        self._refuse_non_finite(feeds)
                    return max(n, 1)
            else:
                n = self._check(feeds)
                if len(self._valid_layouts) < 64:
                    self._valid_layouts.add(layout)
                return n
        return self._check(feeds)

    def _check(self, feeds: dict[str, np.ndarray]) -> int:
        for name in feeds:
            if name not in self._by_name:
                raise InvalidArgument(f"inputs[{quote(name, bare=True)}]", f"unknown input {quote(name)}; the "
                                      "model's inputs are "
                                      + ", ".join(repr(i.name) for i in self.inputs))
        rows = -1
        for spec in self.inputs:
            arr = feeds.get(spec.name)
            if arr is None:
                raise InvalidArgument(f"inputs[{spec.name}]", f"input '{spec.name}' is missing")
            if arr.dtype != spec.dtype:
                raise InvalidArgument(f"inputs[{spec.name}]", f"input '{spec.name}' has datatype "
                                      f"{_v2(arr.dtype)}, the model expects {_v2(spec.dtype)}")
            if spec.shape and (arr.ndim != len(spec.shape) or any(
                    want not in (-1, got) for want, got in zip(spec.shape, arr.shape, strict=True))):
                raise InvalidArgument(f"inputs[{spec.name}]", f"input '{spec.name}' has shape "
                                      f"{quote(list(arr.shape))}, the model expects {list(spec.shape)} (-1: any size)")
            if self.max_batch_size:
                if rows == -1:
                    rows = arr.shape[0]
                elif arr.shape[0] != rows:
                    raise InvalidArgument(f"inputs[{spec.name}]", f"input '{spec.name}' has {arr.shape[0]} rows, "
                                          f"other inputs have {rows}")
        if self.max_batch_size and rows > self.max_batch_size:
            raise InvalidArgument("inputs", f"batch of {rows} rows exceeds the max batch size "
                                  f"{self.max_batch_size}")
        if self._finite_inputs:
            self._refuse_non_finite(feeds)
        return max(rows, 1)

    def _refuse_non_finite(self, feeds: dict[str, np.ndarray]) -> None:
        """NaN or an infinity in a float input of a model whose signature does not allow them:
        INVALID_ARGUMENT naming the input and the first such element. One vectorised test per
        input (about 1.6 us for 32 floats, 6 us for 32k)."""
        for name in self._finite_inputs:
            arr = feeds[name]
            if _ALL(_ISFINITE(arr), axis=None):
                continue
            flat = arr.reshape(-1)
            i = int(np.flatnonzero(~_ISFINITE(flat))[0])
            value = float(flat[i])
            what = "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
            at = [int(d) for d in np.unravel_index(i, arr.shape)]
            raise InvalidArgument(f"inputs[{name}]", f"input {quote(name)} holds {what} at {at}; this model "
                                  "version does not accept NaN or infinities (register it with "
                                  "signature.allow_nan to allow them)")

    # -- execution ---------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self._cuda:
            # The binding's own run: InferenceSession.run re-validates the input names and run
            # options on every call (~1.5 us of Python); `check` has validated the feeds already.
            return self._run(self.output_names, feeds, None)
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def example_inputs(self, rows: int) -> dict[str, np.ndarray]:
        feeds = {}
        for spec in self.inputs:
            shape = [rows if d == -1 and i == 0 else (1 if d == -1 else d) for i, d in enumerate(spec.shape)]
            feeds[spec.name] = (np.full(shape, "", dtype=object) if spec.dtype == np.dtype(object)
                                else np.zeros(shape, dtype=spec.dtype))
        return feeds

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8, 64), runs: int = 5) -> None:
        """Run the model before it reports ready (first runs allocate and pick kernels), and
        time it: `batch_seconds` is the median time of the largest warm-up batch."""
        sizes = [b for b in batch_sizes if b <= max(self.max_batch_size, 1)] or [1]
        for b in sizes:
            feeds = self.example_inputs(b)
            timings = []
            for _ in range(runs):
                t = time.perf_counter()
                self.run(feeds)
                timings.append(time.perf_counter() - t)
        self.batch_seconds = sorted(timings)[len(timings) // 2]


def _v2(dtype: np.dtype) -> str:
    return NUMPY_TO_V2.get(dtype, str(dtype))
