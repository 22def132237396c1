"""Online reads on the event loop against the real Redis: many calls pipelined on one connection
each get their own rows, a dropped connection is re-opened, a cancelled call does not shift the
replies of the next ones, the database number of the URL is honoured, an unreachable Redis is
UNAVAILABLE, and a stale view definition is re-read off the loop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis

from services.common.db import Database
from services.common.errors import Unavailable
from services.features.app import MIGRATIONS
from services.features.definitions import Definitions
from services.features.online import RedisOnlineStore
from services.features.online_serving import OnlineFeatures, OnlineRows, ViewCache
from services.features.types import EntityColumn, Feature, FeatureValues, FeatureView, OnlineQuery, PushRequest
from tests.features.conftest import F64, apply_basics, user_view
from tests.processes import free_port

NOW = 1_800_000_000.0


def _store(db: int = 0) -> RedisOnlineStore:
    store = RedisOnlineStore(f"redis://127.0.0.1:6379/{db}", prefix=f"test-{uuid.uuid4().hex[:8]}")
    try:
        store.client.ping()
    except redis.ConnectionError as e:
        pytest.skip(f"Redis not reachable: {e}")
    return store


@pytest.fixture(params=[0, 3], ids=["db0", "db3"])
def server(request: pytest.FixtureRequest, tmp_path) -> Iterator[OnlineFeatures]:  # noqa: ANN001
    store = _store(request.param)
    db = Database(f"sqlite:///{tmp_path / 'defs.db'}")
    db.migrate(MIGRATIONS)
    d = Definitions(db)
    apply_basics(d)
    d.apply_view(FeatureView(name="merchant_risk", entities=["merchant"], features=[
        Feature(name="rate", dtype=F64)]), "t")
    s = OnlineFeatures(ViewCache(d), store, clock=lambda: NOW)
    n = 200
    s.push(PushRequest(view="merchant_risk", entities={
        "merchant_id": EntityColumn(string_values=[f"m{i}" for i in range(n)])},
        event_timestamps_us=[int((NOW - 60) * 1e6)] * n,
        features=[FeatureValues(name="rate", double_values=[float(i) for i in range(n)])]))
    yield s
    keys = list(store.client.scan_iter(f"{store.prefix}:*"))
    if keys:
        store.client.delete(*keys)
    store.close()
    db.dispose()


def _run(server: OnlineFeatures, main) -> None:  # noqa: ANN001
    """asyncio.run, closing the store's connection on the loop that opened it."""
    async def wrapped() -> None:
        try:
            await main()
        finally:
            server.store.close()
    asyncio.run(wrapped())


def _request(ids: list[int]) -> OnlineQuery:
    return OnlineQuery(features=["merchant_risk:rate"], entities={
        "merchant_id": EntityColumn(string_values=[f"m{i}" for i in ids])})


def _rates(read: OnlineRows) -> list[float]:
    return list(read.values().features[0].double_values)


def test_concurrent_calls_pipelined_on_one_connection_get_their_own_rows(server: OnlineFeatures) -> None:
    async def main() -> None:
        wanted = [[(i * 7 + j) % 200 for j in range(1 + i % 17)] for i in range(300)]
        got = await asyncio.gather(*(server.read_async(_request(ids)) for ids in wanted))
        # Rows were pushed through redis-py into the URL's database: reading them here also
        # shows the pipe selected that database (db3) before its first read.
        assert [_rates(r) for r in got] == [[float(i) for i in ids] for ids in wanted]
    _run(server, main)


def test_a_dropped_connection_is_reopened(server: OnlineFeatures) -> None:
    store: RedisOnlineStore = server.store  # type: ignore[assignment]

    async def main() -> None:
        assert _rates(await server.read_async(_request([5]))) == [5.0]
        host, port = store._pipe._transport.get_extra_info("sockname")[:2]  # noqa: SLF001
        assert store.client.client_kill(f"{host}:{port}")  # the server closes our connection
        await asyncio.sleep(0.05)
        assert _rates(await server.read_async(_request([6, 7]))) == [6.0, 7.0]
    _run(server, main)


def test_a_cancelled_call_does_not_shift_later_replies(server: OnlineFeatures) -> None:
    async def main() -> None:
        first = asyncio.ensure_future(server.read_async(_request(list(range(100)))))
        await asyncio.sleep(0)  # the MGET is written; its reply is still on the way
        first.cancel()
        results = await asyncio.gather(*(server.read_async(_request([i])) for i in (1, 2, 3)))
        assert [_rates(r) for r in results] == [[1.0], [2.0], [3.0]]
    _run(server, main)


def test_stale_definitions_are_reread_and_unknown_views_are_not_found(server: OnlineFeatures) -> None:
    from services.common.errors import NotFound

    async def main() -> None:
        server.views.max_age = 0.0  # every call finds its cached definition stale
        assert _rates(await server.read_async(_request([9]))) == [9.0]
        with pytest.raises(NotFound, match="ghost"):
            await server.read_async(OnlineQuery(features=["ghost:x"], entities={
                "merchant_id": EntityColumn(string_values=["m1"])}))
    _run(server, main)


def test_a_stale_definition_is_served_while_one_reread_runs(server: OnlineFeatures,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Stale-while-revalidate: calls finding the cached definition too old are answered from it
    at once; one re-read per view runs in a thread, however many calls arrive meanwhile; a new
    version is served once read; a failing definitions database does not stop serving."""
    import threading

    definitions = server.views.definitions
    real_get_view = definitions.get_view
    reads, release = [], threading.Event()

    def slow_get_view(name: str, *args, **kw):  # noqa: ANN002, ANN003, ANN202
        reads.append(name)
        release.wait(5)
        return real_get_view(name, *args, **kw)

    async def main() -> None:
        assert (await server.read_async(_request([1]))).values().view_versions["merchant_risk"] == 1  # cached now
        server.views.max_age = 0.0
        monkeypatch.setattr(definitions, "get_view", slow_get_view)
        # A schema change made elsewhere (another process): version 2.
        definitions.apply_view(FeatureView(name="merchant_risk", entities=["merchant"], features=[
            Feature(name="rate", dtype=F64), Feature(name="volume", dtype=F64)]), "t")
        results = await asyncio.gather(*(server.read_async(_request([i])) for i in range(20)))
        assert [r.values().view_versions["merchant_risk"] for r in results] == [1] * 20  # all from the cache
        assert reads == ["merchant_risk"]  # one re-read in flight, not twenty
        release.set()
        for _ in range(100):
            if not server.views._refreshing:
                break
            await asyncio.sleep(0.02)
        assert server.views.peek("merchant_risk").view.spec.version == 2
        assert (await server.read_async(_request([1]))).values().view_versions["merchant_risk"] == 2

        def broken(name: str, *args, **kw):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError("definitions database unreachable")
        monkeypatch.setattr(definitions, "get_view", broken)
        for _ in range(3):
            assert (await server.read_async(_request([1]))).values().view_versions["merchant_risk"] == 2
            await asyncio.sleep(0.02)
    _run(server, main)


def test_unreachable_redis_is_unavailable(tmp_path) -> None:  # noqa: ANN001
    store = RedisOnlineStore(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        with pytest.raises(Unavailable, match="online store"):
            asyncio.run(store.read_many_async([("v", 1, ["a"])]))
    finally:
        store.close()


def test_warm_up_caches_definitions_and_opens_the_connection(server: OnlineFeatures) -> None:
    """Before a process serves: current definitions cached (no first read waits for the database)
    and the loop's Redis connection open; a limit stops early, the rest load on first use."""
    from services.common.swr_cache import NotCached
    server.views.definitions.apply_view(user_view(), "t")
    views = ViewCache(server.views.definitions)
    assert views.warm(limit=1) == 1
    with pytest.raises(NotCached):
        views.fresh("user_stats")  # names in order: merchant_risk first
    assert views.warm() == 2
    assert views.fresh("user_stats").view.spec.name == "user_stats"
    assert views.fresh("merchant_risk").view.spec.version == 1

    async def main() -> None:
        await server.store.warm()
        assert server.store._pipe is not None and not server.store._pipe.lost
        # warming again reuses it
        pipe = server.store._pipe
        await server.store.warm()
        assert server.store._pipe is pipe
    _run(server, main)


def test_warm_up_with_redis_down_is_not_an_error(tmp_path) -> None:  # noqa: ANN001
    store = RedisOnlineStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        asyncio.run(store.warm())  # logged; the first read says UNAVAILABLE
        assert store._pipe is None
    finally:
        store.close()
