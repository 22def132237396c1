"""Which prediction ids each partition holds: what makes ingestion idempotent.

A partition's ids are loaded on its first use in a process (from its Parquet files and the rows
still in the write-ahead log), then kept as it grows, in two parts:

- `recent`: the ids added since the last merge, exactly (a set of strings);
- `base`: every other id as a 96-bit fingerprint, 12 bytes an id: Python's `hash` of the string
  (64-bit SipHash, keyed at random per process, so ids nobody chose cannot be made to collide), in
  sorted order, and beside it the id's CRC-32.

An id is new unless it is in `recent`, earlier in the same batch, or its hash *and* CRC match an
entry of `base`. A hash match alone is a retry in practice; where the CRC differs, it was a
collision and the id is new. Only when both match is a new id taken for a stored one: for a
partition of n ids the chance that this ever happens is about n^2 / 2^97 (1e-11 for a billion ids),
and nothing is read from the store to decide, so a retried batch costs what a new one does.

Memory is bounded by `max_ids` over all loaded partitions: beyond it, the partitions used least
recently are dropped, and loaded again when next used.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from services.monitoring.rows import Partition

#: `recent` is merged into `base` once it holds this many ids.
MERGE_IDS = 65_536


def _hashes(ids: Sequence[str]) -> np.ndarray:
    return np.fromiter(map(hash, ids), np.int64, len(ids))


def _crcs(ids: Sequence[str]) -> np.ndarray:
    return np.fromiter((zlib.crc32(x.encode()) for x in ids), np.uint32, len(ids))


class _Ids:
    __slots__ = ("hashes", "crcs", "recent")

    def __init__(self, ids: Sequence[str]) -> None:
        h = _hashes(ids)
        order = np.argsort(h, kind="stable")
        self.hashes = h[order]
        self.crcs = _crcs(ids)[order]
        self.recent: set[str] = set()

    @property
    def size(self) -> int:
        return self.hashes.size + len(self.recent)

    def stored(self, ids: Sequence[str]) -> set[str]:
        """Those of `ids` whose fingerprint is in `base`."""
        if not self.hashes.size:
            return set()
        h = _hashes(ids)
        lo, hi = self.hashes.searchsorted(h, "left"), self.hashes.searchsorted(h, "right")
        hit = np.flatnonzero(hi > lo)
        if not hit.size:
            return set()
        crcs = _crcs([ids[i] for i in hit.tolist()])
        lo, hi = lo[hit], hi[hit]
        one = hi - lo == 1  # the usual case: one stored id with that hash
        match = np.zeros(hit.size, bool)
        match[one] = self.crcs[lo[one]] == crcs[one]
        for j in np.flatnonzero(~one).tolist():
            match[j] = crcs[j] in self.crcs[lo[j]:hi[j]]
        return {ids[i] for i in hit[match].tolist()}

    def merge(self) -> None:
        recent = list(self.recent)
        h = _hashes(recent)
        order = np.argsort(h, kind="stable")
        h, crcs = h[order], _crcs(recent)[order]
        at = self.hashes.searchsorted(h)
        self.hashes = np.insert(self.hashes, at, h)
        self.crcs = np.insert(self.crcs, at, crcs)
        self.recent = set()


class IdIndex:
    """Not thread-safe: the store calls it under its lock."""

    def __init__(self, load: Callable[[Partition], Sequence[str]], max_ids: int) -> None:
        """`load`: every id a partition holds."""
        self._load = load
        self.max_ids = max_ids
        self._parts: OrderedDict[Partition, _Ids] = OrderedDict()
        self._total = 0

    def new_rows(self, part: Partition, ids: Sequence[str]) -> list[int]:
        """Positions in `ids` of the rows to store: ids the partition does not hold, each id's
        first occurrence only. Changes nothing (see `add`)."""
        p = self._get(part)
        stored = p.stored(ids)
        recent, seen, keep = p.recent, set(), []
        for i, x in enumerate(ids):
            if x in seen or x in recent or x in stored:
                continue
            seen.add(x)
            keep.append(i)
        return keep

    def add(self, part: Partition, ids: Sequence[str]) -> None:
        """Record ids now written for the partition."""
        p = self._get(part)
        before = p.size
        p.recent.update(ids)
        if len(p.recent) >= MERGE_IDS:
            p.merge()
        self._total += p.size - before
        self._evict(keep=part)

    def forget(self) -> None:
        """Drop everything loaded (it is loaded again on use)."""
        self._parts.clear()
        self._total = 0

    def _get(self, part: Partition) -> _Ids:
        p = self._parts.get(part)
        if p is None:
            p = self._parts[part] = _Ids(self._load(part))
            self._total += p.size
            self._evict(keep=part)
        else:
            self._parts.move_to_end(part)
        return p

    def _evict(self, keep: Partition) -> None:
        while self._total > self.max_ids and len(self._parts) > 1:
            oldest = next(iter(self._parts))
            if oldest == keep:
                self._parts.move_to_end(oldest)
                continue
            self._total -= self._parts.pop(oldest).size
