"""The online store: the latest row of every (view version, entity key), read by many keys at
once, and a factory that opens one from a URL.

`base.py` holds the interface (`OnlineStore`), `codec.py` the row layout (`RowCodec`), `resp.py`
the RESP client on the event loop (`RespPipe`), `redis.py` and `sqlite.py` the two backends.
"""

from __future__ import annotations

from .base import OnlineStore
from .codec import FLOATS, INTS, Decoded, RowCodec
from .redis import RedisOnlineStore
from .resp import RespPipe
from .sqlite import SqliteOnlineStore

__all__ = [
    "FLOATS",
    "INTS",
    "Decoded",
    "OnlineStore",
    "RedisOnlineStore",
    "RespPipe",
    "RowCodec",
    "SqliteOnlineStore",
    "open_online_store",
]


def open_online_store(url: str) -> OnlineStore:
    """`redis://host:6379/0` or a SQLite file path (`sqlite:///path` or a plain path)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisOnlineStore(url)
    return SqliteOnlineStore(url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url)
