"""The endpoint store's serving-process bookkeeping on SQLite and PostgreSQL: heartbeats and
per-process statistics (one transaction of upserts every second), summed for the canary guard."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from services.common.db import Database
from services.inference.tables import MIGRATIONS  # not from app: that loads the V2 stubs, which clash with tritonclient's
from services.inference import tables as t
from services.inference.endpoints import EndpointStore
from services.inference.entities import Target, TrafficPolicy
from services.inference.routing import LATENCY_BUCKETS_MS

BUCKETS = len(LATENCY_BUCKETS_MS)


@pytest.fixture()
def endpoints(database_url: str) -> Iterator[EndpointStore]:
    db = Database(database_url)
    db.migrate(MIGRATIONS)
    store = EndpointStore(db)
    store.create("fraud", "", TrafficPolicy(targets=(Target(model="m", version=1, weight=1),)), "alice")
    yield store
    db.dispose()


def _hist(bucket: int, n: int) -> list[int]:
    h = [0] * BUCKETS
    h[bucket] = n
    return h


def test_reports_replace_the_process_rows_and_sum_over_processes(endpoints: EndpointStore) -> None:
    endpoints.report("w1", 101, {"fraud": 1}, {}, [("fraud", 1, "m:1", 10, 1, _hist(2, 10))])
    endpoints.report("w2", 102, {"fraud": 1}, {"other": "revision 3: boom"},
                     [("fraud", 1, "m:1", 5, 0, _hist(3, 5)), ("fraud", 1, "m:1:shadow", 5, 5, _hist(4, 5))])
    # A later report of w1 carries its cumulative figures: it replaces, never adds.
    endpoints.report("w1", 101, {"fraud": 1}, {}, [("fraud", 1, "m:1", 30, 2, _hist(2, 30))])
    stats = endpoints.stats("fraud", 1)
    assert stats["m:1"] == (35, 2, [a + b for a, b in zip(_hist(2, 30), _hist(3, 5), strict=True)])
    assert stats["m:1:shadow"] == (5, 5, _hist(4, 5))
    assert endpoints.stats("fraud", 2) == {}
    live = {w: (applied, failures) for w, applied, failures in endpoints.live_workers(60)}
    assert live == {"w1": ({"fraud": 1}, {}), "w2": ({"fraud": 1}, {"other": "revision 3: boom"})}


def test_a_heartbeat_without_statistics_keeps_the_last_ones(endpoints: EndpointStore) -> None:
    endpoints.report("w1", 101, {"fraud": 1}, {}, [("fraud", 1, "m:1", 7, 0, _hist(0, 7))])
    endpoints.report("w1", 101, {}, {"fraud": "revision 2: no such model"})
    assert endpoints.stats("fraud", 1)["m:1"] == (7, 0, _hist(0, 7))
    assert endpoints.live_workers(60) == [("w1", {}, {"fraud": "revision 2: no such model"})]
    endpoints.forget_worker("w1")
    assert endpoints.live_workers(60) == []


def _stat_rows(endpoints: EndpointStore) -> list[tuple[str, int, str]]:
    with endpoints.db.read() as c:
        return [tuple(r) for r in c.execute(select(
            t.target_stats.c.endpoint, t.target_stats.c.revision, t.target_stats.c.worker_id)).all()]


def test_statistics_stay_bounded_however_often_the_policy_changes(endpoints: EndpointStore) -> None:
    keep = endpoints.keep_revisions
    for _ in range(4 * keep + 3):
        rev = endpoints.get("fraud").revision
        for worker in ("w1", "w2"):
            endpoints.report(worker, 1, {"fraud": rev}, {}, [
                ("fraud", rev, "m:1", 5, 0, _hist(0, 5)), ("fraud", rev, "m:2:shadow", 5, 1, _hist(1, 5))])
        new = TrafficPolicy(targets=(Target(model="m", version=rev + 1, weight=1),))
        endpoints.set_policy("fraud", new, "alice")
    current = endpoints.get("fraud").revision
    rows = _stat_rows(endpoints)
    assert rows and min(r for _, r, _ in rows) > current - keep
    assert len(rows) <= keep * 2 * 2  # revisions kept x targets x serving processes
    # The current revision's figures (what the canary guard and GetEndpointStats read) are kept.
    endpoints.report("w1", 1, {"fraud": current}, {}, [("fraud", current, "m:1", 3, 0, _hist(0, 3))])
    endpoints.prune_stats()
    assert endpoints.stats("fraud", current)["m:1"] == (3, 0, _hist(0, 3))


def test_prune_drops_rows_of_deleted_endpoints_and_of_processes_long_gone(endpoints: EndpointStore) -> None:
    endpoints.report("w1", 101, {"fraud": 1}, {}, [("fraud", 1, "m:1", 5, 0, _hist(0, 5))])
    endpoints.delete("fraud")
    # A serving process that still held the endpoint reports its last figures after the delete.
    endpoints.report("w1", 101, {}, {}, [("fraud", 1, "m:1", 6, 0, _hist(0, 6))])
    endpoints.report("crashed", 102, {"fraud": 1}, {}, [])
    with endpoints.db.session() as c:  # a process that died an hour ago (no deregistration)
        c.execute(update(t.workers).where(t.workers.c.worker_id == "crashed").values(
            heartbeat=datetime.now(UTC) - timedelta(hours=1)))
    assert _stat_rows(endpoints)
    endpoints.prune_stats(worker_ttl_seconds=600)
    assert _stat_rows(endpoints) == []
    with endpoints.db.read() as c:
        assert c.execute(select(t.workers.c.worker_id)).scalars().all() == ["w1"]
