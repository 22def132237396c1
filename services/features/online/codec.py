"""The row codec of the online store: one view version's rows as blobs, and back to columns.

A row is one blob: event time (8 bytes, big-endian unsigned microseconds, so that comparing the
first 8 bytes compares times), one null flag per feature, 8 bytes per numeric or bool feature
(little-endian float64/int64), then the string features, each 4-byte length + UTF-8. Views
without string features have fixed-size rows, so a whole read decodes with one numpy view over
the concatenated blobs (no per-value Python).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.features.types import DataType, FeatureView

FLOATS = {DataType.FLOAT32, DataType.FLOAT64}
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce
INTS = {DataType.INT32, DataType.INT64}


@dataclass
class Decoded:
    """Columns of one read, feature-major so that each feature's column is one contiguous row."""

    found: np.ndarray                # bool per requested key
    event_us: np.ndarray             # int64 per key (0 when not found)
    nulls: np.ndarray                # bool (features, keys), in the view's feature order; True when not found
    fixed: np.ndarray                # little-endian 8-byte words (numeric and bool features, keys); 0 when not found
    strings: dict[str, list[str]]    # string features: one str per key ("" when null or not found)


class RowCodec:
    """Encodes and decodes the rows of one view version."""

    def __init__(self, view: FeatureView) -> None:
        self.fixed = [f for f in view.features if f.dtype != DataType.STRING]
        self.strings = [f for f in view.features if f.dtype == DataType.STRING]
        self.names = [f.name for f in view.features]
        n = len(view.features)
        fields = [("ts", ">u8"), ("nulls", "u1", (n,))]
        for f in self.fixed:
            fields.append((f.name, "<f8" if f.dtype in FLOATS else "<i8"))
        self.dtype = np.dtype(fields)
        self.null_index = {name: i for i, name in enumerate(self.names)}
        self.fixed_index = {f.name: j for j, f in enumerate(self.fixed)}
        self._fixed_offset = 8 + n  # the fixed features follow the time and the null flags, 8 bytes each

    def encode(self, event_us: np.ndarray, columns: dict[str, np.ndarray], nulls: dict[str, np.ndarray]) -> list[bytes]:
        rows = len(event_us)
        rec = np.zeros(rows, dtype=self.dtype)
        rec["ts"] = event_us
        for name, i in self.null_index.items():
            rec["nulls"][:, i] = nulls[name]
        for f in self.fixed:
            rec[f.name] = np.where(nulls[f.name], 0, columns[f.name])
        fixed = rec.tobytes()
        size = self.dtype.itemsize
        if not self.strings:
            return [fixed[i * size:(i + 1) * size] for i in range(rows)]
        out = []
        for i in range(rows):
            tail = []
            for f in self.strings:
                b = b"" if nulls[f.name][i] else str(columns[f.name][i]).encode()
                tail.append(struct.pack("<I", len(b)) + b)
            out.append(fixed[i * size:(i + 1) * size] + b"".join(tail))
        return out

    def decode(self, blobs: Sequence[bytes | None]) -> Decoded:
        n = len(blobs)
        size = self.dtype.itemsize
        if None in blobs:  # (a C-level scan; usually every key is found)
            present = [b for b in blobs if b is not None]
            found = np.fromiter((b is not None for b in blobs), bool, count=n)
        else:
            present, found = blobs, np.ones(n, dtype=bool)
        k = len(present)
        buf = b"".join(b[:size] for b in present) if self.strings else b"".join(present)
        rec = np.frombuffer(buf, dtype=self.dtype)
        # Feature-major copies straight from the row bytes: one strided copy per block.
        nulls_t = rec["nulls"].T.astype(bool)
        fixed_t = np.ndarray((len(self.fixed), k), "<u8", buffer=buf, offset=self._fixed_offset,
                             strides=(8, size)).copy() if k else np.zeros((len(self.fixed), 0), "<u8")
        event_us = rec["ts"].astype(np.int64)
        if k != n:  # rows not found: time 0, all null, values 0
            ev, nl, fx = np.zeros(n, np.int64), np.ones((len(self.names), n), bool), np.zeros((len(self.fixed), n), "<u8")
            ev[found], nl[:, found], fx[:, found] = event_us, nulls_t, fixed_t
            event_us, nulls_t, fixed_t = ev, nl, fx
        strs: dict[str, list[str]] = {}
        if self.strings:
            strs = {f.name: [""] * n for f in self.strings}
            for row, blob in zip(np.flatnonzero(found), present, strict=True):
                pos = size
                for f in self.strings:
                    (length,) = struct.unpack_from("<I", blob, pos)
                    strs[f.name][row] = blob[pos + 4:pos + 4 + length].decode()
                    pos += 4 + length
        return Decoded(found, event_us, nulls_t, fixed_t, strs)

    def all_fixed(self, blobs: Sequence[bytes | None]) -> tuple[bytes, bytes, int, bool] | None:
        """The common case of a raw read, in a few numpy calls: every key found and no string
        features. Returns (fixed words feature-major as little-endian bytes, event times as
        little-endian int64 bytes, the oldest event time, whether any value is null), or None
        when the general `decode` is needed."""
        if self.strings or not blobs or None in blobs:
            return None
        buf = b"".join(blobs)
        rec = np.frombuffer(buf, dtype=self.dtype)
        events = rec["ts"].astype("<i8")
        fixed = np.ndarray((len(self.fixed), len(blobs)), "<u8", buffer=buf, offset=self._fixed_offset,
                           strides=(8, self.dtype.itemsize)).tobytes()
        # The reductions called directly: numpy's .min()/.any() wrappers cost a Python call each.
        return fixed, events.tobytes(), int(_MIN(events)), bool(_MAX(rec["nulls"], axis=None))

    def values(self, decoded: Decoded, name: str) -> np.ndarray | list[str]:
        """One feature's column, typed: float64, int64 or bool array, or a list of str."""
        j = self.fixed_index.get(name)
        if j is None:
            return decoded.strings[name]
        dtype = self.fixed[j].dtype
        word = decoded.fixed[j]
        if dtype in FLOATS:
            return word.view("<f8")
        return word.view("<i8").astype(bool) if dtype == DataType.BOOL else word.view("<i8")
