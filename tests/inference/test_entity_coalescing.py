"""Feature reads of concurrent entity requests: at most `in_flight` at a time per feature list and
key layout, the requests that wait go together in one read, and each gets exactly its rows back.
The reader here is an in-process one that records its calls (the gRPC reader is exercised with
real services in test_entity_features.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from services.common.errors import Unavailable
from services.inference.entity_features import OnlineColumn, OnlineRead, ReadCoalescer


class Recording:
    def __init__(self) -> None:
        self.calls: list[dict[str, list]] = []
        self.gate = asyncio.Event()
        self.fail = False

    async def read(self, features: Sequence[str], keys: Mapping[str, list]) -> OnlineRead:
        self.calls.append(dict(keys))
        await self.gate.wait()
        if self.fail:
            raise Unavailable("feature store down")
        ids = np.array([k if isinstance(k, int) else 99 for k in next(iter(keys.values()))], dtype=np.float64)
        # value = key * 10 + feature index; key 0 is NOT_FOUND
        statuses = np.where(ids == 0, 2, 1).astype(np.uint8)
        return OnlineRead([OnlineColumn(ids * 10 + i, statuses) for i in range(len(features))], {"v": 1})

    async def defaults(self, feature_set: str) -> Mapping[str, float]:
        return {}

    async def close(self) -> None:
        pass


def test_waiting_requests_share_one_read_and_get_their_own_rows() -> None:
    async def main() -> None:
        reader = Recording()
        co = ReadCoalescer(reader, in_flight=1)
        feats = ("v:a", "v:b")
        first = asyncio.create_task(co.read(feats, {"id": [1]}))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(co.read(feats, {"id": ids})) for ids in ([2, 3], [0], [4, 5, 6])]
        other_layout = asyncio.create_task(co.read(feats, {"name": ["x"]}))  # its own group: read at once
        await asyncio.sleep(0)
        assert reader.calls == [{"id": [1]}, {"name": ["x"]}]
        reader.gate.set()
        results = await asyncio.gather(first, *waiting, other_layout)
        assert reader.calls[2:] == [{"id": [2, 3, 0, 4, 5, 6]}]  # the three waiting requests, in one read
        for got, ids in zip(results[1:4], ([2, 3], [0], [4, 5, 6]), strict=True):
            assert [c.values.tolist() for c in got.columns] == [[k * 10 for k in ids], [k * 10 + 1 for k in ids]]
            assert got.columns[0].statuses.tolist() == [2 if k == 0 else 1 for k in ids]
    asyncio.run(main())


def test_a_failed_shared_read_fails_every_request_in_it_and_the_next_read_goes_on() -> None:
    async def main() -> None:
        reader = Recording()
        co = ReadCoalescer(reader, in_flight=1)
        first = asyncio.create_task(co.read(("v:a",), {"id": [1]}))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(co.read(("v:a",), {"id": [i]})) for i in (2, 3)]
        await asyncio.sleep(0)
        reader.fail = True
        reader.gate.set()
        for task in (first, *waiting):
            with pytest.raises(Unavailable):
                await task
        reader.fail = False
        got = await co.read(("v:a",), {"id": [7]})
        assert got.columns[0].values.tolist() == [70.0]
    asyncio.run(main())
