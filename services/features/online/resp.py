"""A Redis client on the event loop, speaking RESP with hiredis (C) parsing the replies.

Redis reads from the serving path go over `RespPipe`: one connection per event loop, on the loop,
with every concurrent call's MGETs pipelined on it (Redis answers in order, so a queue of waiters
matches replies to calls). Measured against redis-py in a worker thread: no thread hop, no
connection pool, no GIL hand-off per call (docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections import deque


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
