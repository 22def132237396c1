"""The SQLite online store (the embedded default): one table in a local file, read in worker
threads; a write keeps the newer row in the upsert's WHERE clause.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


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
