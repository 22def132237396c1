"""The prediction log's record format: strata.inference.v1.PredictionRecord, the message the
monitoring service ingests. `Encoder` puts an entry's wire bytes together on the hot path (the
prediction log, predlog.py, is handed its `encode`); `encode` builds the same record as a message
(the reference the Encoder must match); `read_records` reads a log file back (tests, tools, the
monitoring ingester)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from google.protobuf.internal.encoder import _VarintBytes  # type: ignore[attr-defined]
from strata.inference.v1 import inference_pb2 as pb

from services.inference.codec import NUMPY_TO_STRATA, to_raw_tensor
from services.inference.predlog import Entry, read_frames


def read_records(path: Path) -> list[pb.PredictionRecord]:
    """Read a length-delimited prediction log file."""
    return [pb.PredictionRecord.FromString(r) for r in read_frames(path)]


def encode(e: Entry) -> bytes:
    """The PredictionRecord of an entry, built as a message (the reference `Encoder` must match)."""
    ts, request_id, endpoint, model, version, revision, shadow, latency_ms, inputs, outputs, error = e
    rec = pb.PredictionRecord(request_id=request_id, endpoint=endpoint, model=model, version=version,
                              policy_revision=revision, shadow=shadow, latency_ms=latency_ms, error=error,
                              inputs=[to_raw_tensor(n, a) for n, a in inputs.items()],
                              outputs=[to_raw_tensor(n, a) for n, a in outputs])
    rec.time.FromNanoseconds(int(ts * 1e9))
    return rec.SerializeToString()


_SMALL_VARINTS = [_VarintBytes(i) for i in range(1 << 14)]  # protobuf's encoder is ~0.25 us a call


def _varint(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < 16384 else _VarintBytes(n)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _SMALL_VARINTS[number << 3 | 2] + _varint(len(payload)) + payload


_RAW_TAG = _VarintBytes(4 << 3 | 2)  # Tensor.raw
_LATENCY_TAG = _VarintBytes(7 << 3 | 1)  # PredictionRecord.latency_ms (fixed64)


class Encoder:
    """PredictionRecord wire bytes without building messages: the fields that repeat from record to
    record (endpoint, model, version, revision, shadow; a tensor's name, dtype and shape) are
    encoded once and cached; per record only the id, time, latency, tensor bytes and error are.
    Non-numeric tensors (strings) go through `to_raw_tensor`. Caches are bounded."""

    _MAX = 4096

    def __init__(self) -> None:
        self._heads: dict[tuple, bytes] = {}
        self._tensors: dict[tuple, bytes] = {}
        self._second = (0, b"")

    def encode(self, e: Entry) -> bytes:
        ts, request_id, endpoint, model, version, revision, shadow, latency_ms, inputs, outputs, error = e
        key = (endpoint, model, version, revision, shadow)
        head = self._heads.get(key)
        if head is None:
            head = pb.PredictionRecord(endpoint=endpoint, model=model, version=version, policy_revision=revision,
                                       shadow=shadow).SerializeToString()
            if len(self._heads) < self._MAX:
                self._heads[key] = head
        ns = int(ts * 1e9)
        parts = [_field(1, request_id.encode()) if request_id else b"", head,
                 _LATENCY_TAG + struct.pack("<d", latency_ms) if latency_ms else b"",
                 _field(8, self._timestamp(ns // 1_000_000_000, ns % 1_000_000_000))]
        parts += [self._tensor(9, n, a) for n, a in inputs.items()]
        parts += [self._tensor(10, n, a) for n, a in outputs]
        if error:
            parts.append(_field(11, error.encode()))
        return b"".join(parts)

    def _timestamp(self, seconds: int, nanos: int) -> bytes:
        if self._second[0] != seconds:  # the seconds field changes once a second
            self._second = (seconds, b"\x08" + _varint(seconds) if seconds else b"")
        return self._second[1] + (b"\x10" + _varint(nanos) if nanos else b"")

    def _tensor(self, number: int, name: str, arr: np.ndarray) -> bytes:
        if arr.dtype == np.dtype(object):
            return _field(number, to_raw_tensor(name, arr).SerializeToString())
        key = (name, arr.dtype, arr.shape)
        prefix = self._tensors.get(key)
        if prefix is None:
            prefix = pb.Tensor(name=name, dtype=NUMPY_TO_STRATA.get(arr.dtype, 0), shape=arr.shape).SerializeToString()
            if len(self._tensors) < self._MAX:
                self._tensors[key] = prefix
        raw = np.ascontiguousarray(arr).tobytes()
        return _field(number, prefix + (_RAW_TAG + _varint(len(raw)) + raw if raw else b""))
