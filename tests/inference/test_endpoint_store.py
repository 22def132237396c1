"""The endpoint store's serving-process bookkeeping on SQLite and PostgreSQL: heartbeats and
per-process statistics (one transaction of upserts every second), summed for the canary guard."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from strata.inference.v1 import inference_pb2 as pb

from services.common.db import Database
from services.inference.tables import MIGRATIONS  # not from app: that loads the V2 stubs, which clash with tritonclient's
from services.inference.endpoints import EndpointStore
from services.inference.routing import LATENCY_BUCKETS_MS

BUCKETS = len(LATENCY_BUCKETS_MS)


@pytest.fixture()
def endpoints(database_url: str) -> Iterator[EndpointStore]:
    db = Database(database_url)
    db.migrate(MIGRATIONS)
    store = EndpointStore(db)
    store.create("fraud", "", pb.TrafficPolicy(targets=[pb.Target(model="m", version=1, weight=1)]), "alice")
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
