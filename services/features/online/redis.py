"""The Redis online store (production). Serving reads run on the event loop over `RespPipe`
(plain TCP and unix sockets) or through redis-py in a worker thread (TLS, `rediss://`); a write
keeps the newer row in a Lua script.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from services.common.errors import Unavailable

from .resp import RespPipe, _resp

log = logging.getLogger("strata.features")


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
