"""The online store: the latest row of every (view version, entity key), read by many keys at
once. Two backends with one behaviour: embedded SQLite (default) and Redis (production).

A row is one blob: event time (8 bytes, big-endian unsigned microseconds, so that comparing the
first 8 bytes compares times), one null flag per feature, 8 bytes per numeric or bool feature
(little-endian float64/int64), then the string features, each 4-byte length + UTF-8. Views
without string features have fixed-size rows, so a whole read decodes with one numpy view over
the concatenated blobs (no per-value Python). A write never replaces a newer row with an older
one: both backends compare the time prefix where the data lives (a Lua script in Redis, an
upsert with a WHERE clause in SQLite), so concurrent writers cannot reorder history.

Redis reads from the serving path go over `RespPipe`: one connection per event loop, on the loop,
with every concurrent call's MGETs pipelined on it (Redis answers in order, so a queue of waiters
matches replies to calls). Measured against redis-py in a worker thread: no thread hop, no
connection pool, no GIL hand-off per call (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as pb

from services.common.errors import Unavailable

log = logging.getLogger("strata.features")

_DT = types_pb2.DataType
FLOATS = {_DT.DATA_TYPE_FLOAT32, _DT.DATA_TYPE_FLOAT64}
_MIN, _MAX = np.minimum.reduce, np.maximum.reduce
INTS = {_DT.DATA_TYPE_INT32, _DT.DATA_TYPE_INT64}


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
        return word.view("<i8").astype(bool) if dtype == _DT.DATA_TYPE_BOOL else word.view("<i8")


class OnlineStore(Protocol):
    #: Whether `read_many_async` reads on the event loop (else callers use a worker thread).
    async_reads: bool

    def write(self, view: str, version: int, keys: Sequence[str], blobs: Sequence[bytes]) -> None: ...
    def read(self, view: str, version: int, keys: Sequence[str]) -> list[bytes | None]: ...
    def read_many(self, reads: Sequence[tuple[str, int, Sequence[str]]]) -> list[list[bytes | None]]: ...
    async def read_many_async(self, reads: Sequence[tuple[str, int, Sequence[str]]]) -> list[list[bytes | None]]: ...
    #: Before the first read (the serving process's warm-up): open what the reads will need.
    async def warm(self) -> None: ...
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


class RespPipe(asyncio.Protocol):
    """One Redis connection on an event loop. `call(payload, replies)` writes a pipelined batch
    of commands and resolves with their `replies` replies, parsed by hiredis (C)."""

    def __init__(self) -> None:
        import hiredis
        self._reader = hiredis.Reader()
        self._protocol_error = hiredis.ProtocolError
        self._waiters: deque[tuple[asyncio.Future, int, list]] = deque()
        self._transport: asyncio.Transport | None = None
        self.lost = False
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while self._waiters:
                reply = self._reader.gets()
                if reply is False:
                    return
                fut, want, got = self._waiters[0]
                got.append(reply)
                if len(got) == want:
                    self._waiters.popleft()
                    if not fut.done():  # a cancelled call's replies are read and dropped
                        fut.set_result(got)
        except self._protocol_error as e:
            self._fail(ConnectionError(f"redis protocol error: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"redis connection lost: {exc or 'closed by the server'}"))

    def _fail(self, exc: Exception) -> None:
        self.lost = True
        while self._waiters:
            fut = self._waiters.popleft()[0]
            if not fut.done():
                fut.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    def call(self, payload: bytes, replies: int) -> asyncio.Future:
        if self.lost:
            raise ConnectionError("redis connection lost")
        fut = self.loop.create_future()
        self._waiters.append((fut, replies, []))
        self._transport.write(payload)  # type: ignore[union-attr]
        return fut

    def close(self) -> None:
        self.lost = True
        if self._transport is not None and not self.loop.is_closed():
            self._transport.abort()


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class RedisOnlineStore:
    """Keys `sf:{view}:v{version}:{entity key}`; a read is one MGET (one round trip) for all its views."""

    def __init__(self, url: str, prefix: str = "sf") -> None:
        import redis
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self._set_if_newer = self.client.register_script(_REDIS_SET_IF_NEWER)
        pool = self.client.connection_pool
        self._conn_kwargs = pool.connection_kwargs
        # TLS (rediss://) stays on redis-py in a worker thread; plain TCP and unix sockets pipeline on the loop.
        self.async_reads = pool.connection_class in (redis.Connection, redis.UnixDomainSocketConnection)
        self._pipe: RespPipe | None = None
        self._connecting: asyncio.Future | None = None

    def _key(self, view: str, version: int, key: str) -> str:
        return f"{self.prefix}:{view}:v{version}:{key}"

    def write(self, view: str, version: int, keys: Sequence[str], blobs: Sequence[bytes]) -> None:
        for start in range(0, len(keys), 1000):  # one script call per 1,000 rows keeps Redis responsive
            self._set_if_newer(keys=[self._key(view, version, k) for k in keys[start:start + 1000]],
                               args=list(blobs[start:start + 1000]))

    def _mget(self, reads: Sequence[tuple[str, int, Sequence[str]]]) -> bytes | None:
        """The RESP frame of one MGET for the keys of all `reads` (every view of a request: one
        command, one reply), built here in one pass: redis-py's generic argument packing costs
        ~4 us per key in Python, more than the round trip for 100 keys. None when no keys."""
        total = sum(len(keys) for _, _, keys in reads)
        if not total:
            return None
        bodies = []
        for view, version, keys in reads:
            # "\r\n$<len>\r\n<prefix>" before each key, one per key length, interleaved with the
            # keys and joined by C loops (map, slice assignment, join): no Python bytecode per key.
            prefix = f"{self.prefix}:{view}:v{version}:"
            plen = len(prefix)
            heads = {n: f"\r\n${plen + n}\r\n{prefix}" for n in set(map(len, keys))}
            parts: list[str] = [""] * (2 * len(keys))
            parts[0::2] = map(heads.__getitem__, map(len, keys))
            parts[1::2] = keys
            bodies.append("".join(parts))
        body = "".join(bodies)
        if body.isascii():  # then character counts are byte counts; one encode for the whole frame
            return b"*%d\r\n$4\r\nMGET" % (total + 1) + body.encode() + b"\r\n"
        return _resp(b"MGET", *[f"{self.prefix}:{v}:v{ver}:{k}".encode() for v, ver, keys in reads for k in keys])

    def read(self, view: str, version: int, keys: Sequence[str]) -> list[bytes | None]:
        return self.read_many([(view, version, keys)])[0]

    def read_many(self, reads: Sequence[tuple[str, int, Sequence[str]]]) -> list[list[bytes | None]]:
        """The keys of all the views of a request in one MGET: one round trip."""
        frame = self._mget(reads)
        if frame is None:
            return [[] for _ in reads]
        conn = self.client.connection_pool.get_connection()
        try:
            conn.send_packed_command([frame])
            reply = conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self.client.connection_pool.release(conn)
        return self._spread(reads, reply)

    @staticmethod
    def _spread(reads: Sequence[tuple[str, int, Sequence[str]]], reply: list) -> list[list[bytes | None]]:
        """The one MGET reply cut back into one list per read, in order."""
        out, start = [], 0
        for _, _, keys in reads:
            out.append(reply[start:start + len(keys)])
            start += len(keys)
        return out

    async def _open_pipe(self) -> RespPipe:
        loop = asyncio.get_running_loop()
        kw = self._conn_kwargs
        timeout = kw.get("socket_connect_timeout") or 5.0
        if "path" in kw:
            connect = loop.create_unix_connection(RespPipe, kw["path"])
        else:
            connect = loop.create_connection(RespPipe, kw.get("host", "localhost"), kw.get("port", 6379))
        _, pipe = await asyncio.wait_for(connect, timeout)
        setup = []  # AUTH and SELECT first, pipelined; their replies are checked like any other
        if kw.get("password"):
            user = kw.get("username")
            setup.append(_resp(b"AUTH", *([user.encode()] if user else []), str(kw["password"]).encode()))
        if kw.get("db"):
            setup.append(_resp(b"SELECT", str(kw["db"]).encode()))
        if setup:
            for reply in await asyncio.wait_for(pipe.call(b"".join(setup), len(setup)), timeout):
                if isinstance(reply, Exception):
                    pipe.close()
                    raise ConnectionError(f"redis: {reply}")
        return pipe

    async def _get_pipe(self) -> RespPipe:
        pipe = self._pipe
        if pipe is not None and not pipe.lost and pipe.loop is asyncio.get_running_loop():
            return pipe
        if self._connecting is None or self._connecting.get_loop() is not asyncio.get_running_loop():
            # One connect for all the calls that find no connection at the same moment.
            self._connecting = asyncio.ensure_future(self._open_pipe())
        connecting = self._connecting
        try:
            pipe = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        if self._pipe is not pipe:
            if self._pipe is not None:
                self._pipe.close()
            self._pipe = pipe
        return pipe

    async def warm(self) -> None:
        """Open this loop's connection before the first call; a Redis not up yet is not an error
        here (the first read connects, or says UNAVAILABLE)."""
        if self.async_reads:
            try:
                await self._get_pipe()
            except (OSError, asyncio.TimeoutError) as e:
                log.warning("online store (redis) not reachable at start: %s", e)

    async def read_many_async(self, reads: Sequence[tuple[str, int, Sequence[str]]]) -> list[list[bytes | None]]:
        """`read_many` on the event loop: the one MGET pipelined with every other call in flight
        on this loop's connection. Reads are idempotent, so a call
        that finds the connection broken reconnects and retries once."""
        frame = self._mget(reads)
        if frame is None:
            return [[] for _ in reads]
        for attempt in (1, 2):
            try:
                pipe = await self._get_pipe()
                (reply,) = await pipe.call(frame, 1)
                break
            except (OSError, asyncio.TimeoutError) as e:  # ConnectionError is an OSError
                if attempt == 2:
                    raise Unavailable(f"online store (redis) unreachable: {e}") from e
        if isinstance(reply, Exception):
            raise RuntimeError(f"redis MGET failed: {reply}")
        return self._spread(reads, reply)

    def close(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        self.client.close()


class SqliteOnlineStore:
    """One table in an embedded SQLite file (WAL), keyed by (view, version, entity key)."""

    async_reads = False  # reads are blocking file I/O: callers run them in a worker thread

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

    async def read_many_async(self, reads: Sequence[tuple[str, int, Sequence[str]]]) -> list[list[bytes | None]]:
        return await asyncio.to_thread(self.read_many, reads)

    async def warm(self) -> None:
        """Nothing to open ahead: each worker thread opens its own connection on first use."""

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()


def open_online_store(url: str) -> OnlineStore:
    """`redis://host:6379/0` or a SQLite file path (`sqlite:///path` or a plain path)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisOnlineStore(url)
    return SqliteOnlineStore(url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url)
