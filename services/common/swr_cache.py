"""A stale-while-revalidate cache: key -> value, read from its source on first use and re-read
once it is older than `max_age` seconds, for things that change rarely and are read on every
call (feature view definitions, feature sets).

An old value is still served while one re-read per key runs: in a worker thread when the call is
on the event loop (`fresh`, `get_async`), in the calling thread when it is a worker thread
(`current`). Otherwise every call arriving during a re-read would start its own, and a source
that is briefly unreachable would stop serving values that have not changed.

The contract:
- `load(key, cached)` reads the current value; `cached` is the value held now (None when there
  is none), so a loader can return it unchanged when the source says nothing changed, keeping
  what was derived from it.
- A value is young while `clock() - loaded <= max_age`, `loaded` being the clock when its read
  returned. `max_age = 0` re-reads on every call that finds the value (tests use it).
- One re-read in flight per key, across the event loop and all worker threads: a lock guards the
  claim of a re-read only. A call that finds a young value takes no lock and awaits nothing.
- A re-read of an old value (in the background, or in the worker thread that claimed it) that
  fails with `NotFound` (the source has no such key any more) drops the entry: the next call
  reads again and reports NOT_FOUND. Any other failure is logged and keeps the old value; the
  next call that finds it old tries again.
- Any other read (`get`, a missing value) raises to its caller, and a value held stays.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from services.common.errors import NotFound

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
log = logging.getLogger("strata.cache")


class NotCached(Exception):
    """`fresh` found no value for the key: read it off the event loop (`get` in a thread)."""


class _Entry(Generic[V]):
    __slots__ = ("loaded", "value")

    def __init__(self, value: V, loaded: float) -> None:
        self.value = value
        self.loaded = loaded


class SwrCache(Generic[K, V]):
    """See the module docstring. `what` names the values in log messages ("feature view")."""

    def __init__(self, load: Callable[[K, V | None], V], max_age: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, what: str = "entry") -> None:
        self.max_age = max_age
        self._load = load
        self._clock = clock
        self._what = what
        self._entries: dict[K, _Entry[V]] = {}
        self._refreshing: set[K] = set()  # keys being re-read (by any thread)
        self._claims = threading.Lock()   # guards _refreshing

    def get(self, key: K) -> V:
        """Blocking: the cached value while young, otherwise read now."""
        e = self._entries.get(key)
        if e is not None and self._clock() - e.loaded <= self.max_age:
            return e.value
        value = self._load(key, None if e is None else e.value)
        self._entries[key] = _Entry(value, self._clock())
        return value

    def fresh(self, key: K) -> V:
        """On the event loop, without a read: the cached value, or `NotCached` when there is none.
        An old value is returned too, and one re-read of it starts in a worker thread."""
        e = self._entries.get(key)
        if e is None:
            raise NotCached(key)
        if self._clock() - e.loaded > self.max_age and self._claim(key):
            done = asyncio.get_running_loop().run_in_executor(None, self._refresh, key)
            done.add_done_callback(lambda _: self._release(key))
        return e.value

    async def get_async(self, key: K) -> V:
        """On the event loop: as `fresh`; a missing value is read in a worker thread."""
        try:
            return self.fresh(key)
        except NotCached:
            return await asyncio.to_thread(self.get, key)

    def current(self, key: K) -> V:
        """In a worker thread: as `fresh`, but a missing value is read now, and the one re-read
        of an old value runs in the thread that claimed it (the others return the old value)."""
        e = self._entries.get(key)
        if e is None:
            return self.get(key)
        if self._clock() - e.loaded <= self.max_age or not self._claim(key):
            return e.value
        try:
            self._refresh(key)
        finally:
            self._release(key)
        e = self._entries.get(key)
        return self.get(key) if e is None else e.value  # dropped (gone): get reports NOT_FOUND

    def peek(self, key: K) -> V | None:
        """The cached value, young or old, without reading; None when there is none."""
        e = self._entries.get(key)
        return None if e is None else e.value

    def drop(self, key: K) -> None:
        """Forget the key's value (the caller changed it): the next call reads it again."""
        self._entries.pop(key, None)

    def _claim(self, key: K) -> bool:
        with self._claims:
            if key in self._refreshing:
                return False
            self._refreshing.add(key)
            return True

    def _release(self, key: K) -> None:
        with self._claims:
            self._refreshing.discard(key)

    def _refresh(self, key: K) -> None:
        try:
            self.get(key)
        except NotFound:
            self._entries.pop(key, None)  # gone: the next call reports NOT_FOUND
        except Exception:  # keep serving the old value; the next call tries again
            log.warning("re-reading %s %s failed", self._what, key, exc_info=True)
