"""The stale-while-revalidate cache: young values are served without a read, old ones are served
while one re-read per key runs (on the event loop and across worker threads alike), a failing
source keeps the old value, a source that no longer has the key drops it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.errors import NotFound
from services.common.swr_cache import NotCached, SwrCache


class Source:
    """A source whose value per key is set by the test; reads are counted and can be held."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.reads: list[tuple[str, object]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.error: Exception | None = None

    def load(self, key: str, cached: object) -> object:
        self.reads.append((key, cached))
        self.entered.set()
        assert self.release.wait(5)
        if self.error is not None:
            raise self.error
        if key not in self.values:
            raise NotFound(f"things/{key}")
        return self.values[key]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def source() -> Source:
    return Source()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(source: Source, clock: Clock) -> SwrCache[str, object]:
    return SwrCache(source.load, max_age=1.0, clock=clock, what="thing")


def _old_value_with_a_slow_source(cache: SwrCache, source: Source, clock: Clock) -> None:
    """"a" cached as v1 and now old; the source has v2, and its next read waits for `release`."""
    source.values["a"] = "v1"
    cache.get("a")
    source.values["a"], source.reads = "v2", []
    source.release.clear()
    source.entered.clear()
    clock.now += 5


async def _fresh(cache: SwrCache, key: str) -> object:
    return cache.fresh(key)  # on a running event loop, as the online read calls it


async def _settle(cache: SwrCache) -> None:
    for _ in range(250):
        if not cache._refreshing:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("re-read still in flight")


def test_a_young_value_is_served_without_a_read(cache: SwrCache, source: Source, clock: Clock) -> None:
    source.values["a"] = "v1"
    assert cache.get("a") == "v1"
    source.values["a"] = "v2"
    clock.now += 1.0  # exactly max_age: still young
    assert (cache.get("a"), cache.current("a"), cache.peek("a")) == ("v1", "v1", "v1")
    assert source.reads == [("a", None)]


def test_a_missing_value_is_read_now_or_reported_on_the_event_loop(cache: SwrCache, source: Source) -> None:
    source.values["a"] = "v1"
    with pytest.raises(NotCached):
        asyncio.run(_fresh(cache, "a"))
    assert cache.peek("a") is None and source.reads == []
    assert asyncio.run(cache.get_async("a")) == "v1"  # read in a worker thread
    assert cache.current("a") == "v1"
    with pytest.raises(NotFound, match="things/b"):
        cache.current("b")


def test_the_loader_gets_the_cached_value_and_may_keep_it(source: Source, clock: Clock) -> None:
    """As a view whose version did not change keeps its cached entry (and what was built from it)."""
    def load(key: str, cached: object) -> object:
        value = source.load(key, cached)
        return cached if cached == value else value
    cache: SwrCache[str, object] = SwrCache(load, max_age=1.0, clock=clock)
    kept = ["refs"]
    source.values["a"] = kept
    cache.get("a")
    source.values["a"] = ["refs"]  # equal, not the same object
    clock.now += 5
    assert cache.get("a") is kept
    assert source.reads[-1] == ("a", kept)
    source.values["a"] = ["other"]
    clock.now += 0.5
    assert cache.get("a") is kept  # young again: kept values are re-timed like new ones


def test_an_old_value_is_served_on_the_loop_while_one_reread_runs(cache: SwrCache, source: Source,
                                                                 clock: Clock) -> None:
    _old_value_with_a_slow_source(cache, source, clock)

    async def main() -> None:
        assert [cache.fresh("a") for _ in range(20)] == ["v1"] * 20
        assert [await cache.get_async("a") for _ in range(5)] == ["v1"] * 5
        assert source.entered.wait(5)
        assert source.reads == [("a", "v1")]  # one re-read, not twenty-five
        source.release.set()
        await _settle(cache)
        assert cache.fresh("a") == "v2"
    asyncio.run(main())


def test_one_reread_across_worker_threads_and_the_loop(cache: SwrCache, source: Source, clock: Clock) -> None:
    """A thread that claims the re-read does it; the other threads, and the event loop, are
    answered from the old value meanwhile and start none of their own."""
    _old_value_with_a_slow_source(cache, source, clock)
    first = threading.Thread(target=cache.current, args=("a",))
    first.start()
    assert source.entered.wait(5)
    others: list[object] = []
    threads = [threading.Thread(target=lambda: others.append(cache.current("a"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert others == ["v1"] * 8
    assert asyncio.run(_fresh(cache, "a")) == "v1"
    assert source.reads == [("a", "v1")]
    source.release.set()
    first.join(5)
    assert not first.is_alive() and cache.current("a") == "v2"


def test_a_failing_source_keeps_the_old_value(cache: SwrCache, source: Source, clock: Clock,
                                              caplog: pytest.LogCaptureFixture) -> None:
    source.values["a"] = "v1"
    cache.get("a")
    source.error = RuntimeError("source unreachable")
    clock.now += 5
    assert cache.current("a") == "v1"  # the claiming thread's re-read failed: logged, old value kept

    async def main() -> None:
        assert cache.fresh("a") == "v1"
        await _settle(cache)
        assert cache.fresh("a") == "v1"  # still old: a failed re-read does not re-time it
        await _settle(cache)
    asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.name == "strata.cache"] == \
        ["re-reading thing a failed"] * 3
    with pytest.raises(RuntimeError):
        cache.get("a")  # a read that is not a re-read reports the error
    assert cache.peek("a") == "v1"


def test_a_key_gone_from_the_source_is_dropped(cache: SwrCache, source: Source, clock: Clock) -> None:
    source.values["a"] = source.values["b"] = "v1"
    cache.get("a")
    cache.get("b")
    del source.values["a"], source.values["b"]
    clock.now += 5
    with pytest.raises(NotFound, match="things/a"):
        cache.current("a")  # re-read in this thread, dropped, then reported

    async def main() -> None:
        assert cache.fresh("b") == "v1"  # served once more while the re-read runs
        await _settle(cache)
        with pytest.raises(NotCached):
            cache.fresh("b")
    asyncio.run(main())
    assert cache.peek("a") is None and cache.peek("b") is None


def test_drop_forgets_a_value(cache: SwrCache, source: Source) -> None:
    source.values["a"] = "v1"
    cache.get("a")
    source.values["a"] = "v2"
    cache.drop("a")
    cache.drop("never-cached")
    assert cache.current("a") == "v2"
