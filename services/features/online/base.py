"""The online store interface: the latest row of every (view version, entity key), read by many
keys at once. Two backends with one behaviour: embedded SQLite (`sqlite.py`, default) and Redis
(`redis.py`, production). The rows are opaque blobs here (their layout: `codec.py`).

A write never replaces a newer row with an older one: both backends compare the time prefix where
the data lives (a Lua script in Redis, an upsert with a WHERE clause in SQLite), so concurrent
writers cannot reorder history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


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
