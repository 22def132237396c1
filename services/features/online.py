"""The online store: the latest row of every (view version, entity key), read by many keys at
once. Two backends with one behaviour: embedded SQLite (default) and Redis (production).

A row is one blob: event time (8 bytes, big-endian unsigned microseconds, so that comparing the
first 8 bytes compares times), one null flag per feature, 8 bytes per numeric or bool feature
(little-endian float64/int64), then the string features, each 4-byte length + UTF-8. Views
without string features have fixed-size rows, so a whole read decodes with one numpy view over
the concatenated blobs (no per-value Python). A write never replaces a newer row with an older
one: both backends compare the time prefix where the data lives (a Lua script in Redis, an
upsert with a WHERE clause in SQLite), so concurrent writers cannot reorder history.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as pb

_DT = types_pb2.DataType
FLOATS = {_DT.DATA_TYPE_FLOAT32, _DT.DATA_TYPE_FLOAT64}
INTS = {_DT.DATA_TYPE_INT32, _DT.DATA_TYPE_INT64}


@dataclass
class Decoded:
    """Columns of one read: per feature an array (with nulls) and the row metadata."""

    found: np.ndarray                # bool per requested key
    event_us: np.ndarray             # int64 per key (0 when not found)
    nulls: dict[str, np.ndarray]     # bool per key, per feature
    values: dict[str, np.ndarray | list]  # float64/int64/bool arrays, or lists of str


class RowCodec:
    """Encodes and decodes the rows of one view version."""

    def __init__(self, view: pb.FeatureView) -> None:
        self.fixed = [f for f in view.features if f.dtype != _DT.DATA_TYPE_STRING]
        self.strings = [f for f in view.features if f.dtype == _DT.DATA_TYPE_STRING]
        self.names = [f.name for f in view.features]
        n = len(view.features)
        fields = [("ts", ">u8"), ("nulls", "u1", (n,))]
        for f in self.fixed:
            fields.append((f.name, "<f8" if f.dtype in FLOATS else "<i8"))
        self.dtype = np.dtype(fields)
        self.null_index = {name: i for i, name in enumerate(self.names)}

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
        present = [b for b in blobs if b is not None]
        all_found = len(present) == n
        found = np.ones(n, dtype=bool) if all_found else np.fromiter((b is not None for b in blobs), bool, count=n)
        rec = np.frombuffer(b"".join(b[:size] for b in present) if self.strings else b"".join(present),
                            dtype=self.dtype)

        def column(data: np.ndarray, fill: object, dtype: object) -> np.ndarray:
            if all_found:  # the common case: views of the record array, no copies
                return data
            out = np.full((n, *data.shape[1:]), fill, dtype=dtype)
            out[found] = data
            return out
        event_us = column(rec["ts"].astype(np.int64), 0, np.int64)
        null_matrix = column(rec["nulls"].astype(bool), True, bool)
        nulls = {name: null_matrix[:, i] for name, i in self.null_index.items()}
        values: dict[str, np.ndarray | list] = {}
        for f in self.fixed:
            col = column(rec[f.name], 0, np.float64 if f.dtype in FLOATS else np.int64)
            values[f.name] = col.astype(bool) if f.dtype == _DT.DATA_TYPE_BOOL else col
        if self.strings:
            strs = {f.name: [""] * n for f in self.strings}
            for row, blob in zip(np.flatnonzero(found), present, strict=True):
                pos = size
                for f in self.strings:
                    (length,) = struct.unpack_from("<I", blob, pos)
                    strs[f.name][row] = blob[pos + 4:pos + 4 + length].decode()
                    pos += 4 + length
            values.update(strs)
        return Decoded(found, event_us, nulls, values)


class OnlineStore(Protocol):
    def write(self, view: str, version: int, keys: Sequence[str], blobs: Sequence[bytes]) -> None: ...
    def read(self, view: str, version: int, keys: Sequence[str]) -> list[bytes | None]: ...
    def read_many(self, reads: Sequence[tuple[str, int, Sequence[str]]]) -> list[list[bytes | None]]: ...
    def close(self) -> None: ...


# Newer-or-equal event time wins: the first 8 bytes are the big-endian time.
_REDIS_SET_IF_NEWER = """
for i, key in ipairs(KEYS) do
  local new = ARGV[i]
  local cur = redis.call('GET', key)
  if (not cur) or string.sub(cur, 1, 8) <= string.sub(new, 1, 8) then
    redis.call('SET', key, new)
  end
end
return #KEYS
"""


class RedisOnlineStore:
    """Keys `sf:{view}:v{version}:{entity key}`; reads are one MGET (one round trip) per view."""

    def __init__(self, url: str, prefix: str = "sf") -> None:
        import redis
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self._set_if_newer = self.client.register_script(_REDIS_SET_IF_NEWER)

    def _key(self, view: str, version: int, key: str) -> str:
        return f"{self.prefix}:{view}:v{version}:{key}"

    def write(self, view: str, version: int, keys: Sequence[str], blobs: Sequence[bytes]) -> None:
        for start in range(0, len(keys), 1000):  # one script call per 1,000 rows keeps Redis responsive
            self._set_if_newer(keys=[self._key(view, version, k) for k in keys[start:start + 1000]],
                               args=list(blobs[start:start + 1000]))

    def _mget(self, view: str, version: int, keys: Sequence[str]) -> bytes:
        # The RESP frame of one MGET, built here in one pass: redis-py's generic argument
        # packing costs ~4 us per key in Python, more than the round trip for 100 keys.
        prefix = f"{self.prefix}:{view}:v{version}:".encode()
        parts = [b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)]
        for k in keys:
            key = prefix + k.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(key), key))
        return b"".join(parts)

    def read(self, view: str, version: int, keys: Sequence[str]) -> list[bytes | None]:
        return self.read_many([(view, version, keys)])[0]

    def read_many(self, reads: Sequence[tuple[str, int, Sequence[str]]]) -> list[list[bytes | None]]:
        """Several MGETs pipelined: one round trip for all the views of a request."""
        frames = [self._mget(v, ver, keys) for v, ver, keys in reads if keys]
        if not frames:
            return [[] for _ in reads]
        conn = self.client.connection_pool.get_connection()
        try:
            conn.send_packed_command([b"".join(frames)])
            replies = [conn.read_response() for _ in frames]
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self.client.connection_pool.release(conn)
        it = iter(replies)
        return [next(it) if keys else [] for _, _, keys in reads]

    def close(self) -> None:
        self.client.close()


class SqliteOnlineStore:
    """One table in an embedded SQLite file (WAL), keyed by (view, version, entity key)."""

    def __init__(self, path: str) -> None:
        import sqlite3
        import threading
        self._path = path
        self._local = threading.local()
        self._sqlite3 = sqlite3
        with self._conn() as c:
            c.execute("CREATE TABLE IF NOT EXISTS online_rows (view TEXT NOT NULL, version INTEGER NOT NULL, "
                      "entity_key TEXT NOT NULL, blob BLOB NOT NULL, PRIMARY KEY (view, version, entity_key)) "
                      "WITHOUT ROWID")

    def _conn(self):  # noqa: ANN202 - one connection per thread (sqlite3 objects are not shared)
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._sqlite3.connect(self._path, timeout=30, isolation_level=None, check_same_thread=True)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = c
        return c

    def write(self, view: str, version: int, keys: Sequence[str], blobs: Sequence[bytes]) -> None:
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(
                "INSERT INTO online_rows (view, version, entity_key, blob) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (view, version, entity_key) DO UPDATE SET blob = excluded.blob "
                "WHERE substr(excluded.blob, 1, 8) >= substr(online_rows.blob, 1, 8)",
                [(view, version, k, b) for k, b in zip(keys, blobs, strict=True)])
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def read(self, view: str, version: int, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        found: dict[str, bytes] = {}
        c = self._conn()
        for start in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            chunk = list(keys[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for k, b in c.execute(f"SELECT entity_key, blob FROM online_rows WHERE view = ? AND version = ? "  # noqa: S608
                                  f"AND entity_key IN ({marks})", [view, version, *chunk]):
                found[k] = b
        return [found.get(k) for k in keys]

    def read_many(self, reads: Sequence[tuple[str, int, Sequence[str]]]) -> list[list[bytes | None]]:
        return [self.read(v, ver, keys) for v, ver, keys in reads]

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()


def open_online_store(url: str) -> OnlineStore:
    """`redis://host:6379/0` or a SQLite file path (`sqlite:///path` or a plain path)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisOnlineStore(url)
    return SqliteOnlineStore(url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url)
