"""Dynamic batching per model version, with Triton's semantics.

A batch is formed as soon as the model is free, from whatever is queued, up to max_batch_size
rows; an idle model never waits. Only when a full batch cannot be formed may the batcher wait,
at most max_queue_delay_us, for more requests. The queue is bounded: beyond max_queue_size
waiting requests a call fails at once with RESOURCE_EXHAUSTED instead of queueing forever.

A model that takes milliseconds runs on one thread of its own (ONNX Runtime releases the GIL), so
the event loop keeps parsing and queueing the next requests while a batch computes. A model that
computes a full batch in well under a millisecond (a small tabular model) runs inline on the
event loop instead: handing it to a thread and back costs more than the model itself, and the
requests that arrive meanwhile wait in gRPC's queue and form the next batch all the same.
Outputs go back to each request as numpy views of the batch's output (no copies).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from prometheus_client import Gauge, Histogram

from services.common.errors import ResourceExhausted
from services.inference.runtime import ModelRuntime

BATCH_ROWS = Histogram("strata_inference_batch_rows", "Rows per model execution", ["model", "version"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
QUEUE_DEPTH = Gauge("strata_inference_queue_depth", "Requests waiting for the model",
                    ["model", "version"], multiprocess_mode="livesum")
COMPUTE_SECONDS = Histogram("strata_inference_compute_seconds", "Model execution time per batch",
                            ["model", "version"],
                            buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1))


# Models whose largest warm-up batch took less than this run inline on the event loop
# (STRATA_INFERENCE_INLINE_US, set by the service's wiring from its typed settings).
INLINE_SECONDS = 0.001


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024


@dataclass
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future
    enqueued: float


@dataclass
class Stats:
    """Cumulative figures for the V2 ModelStatistics call."""

    inference_count: int = 0
    execution_count: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    last_inference_ms: int = 0


class Batcher:
    def __init__(self, runtime: ModelRuntime, config: BatchingConfig, model: str, version: int) -> None:
        self.runtime = runtime
        self.config = config
        # A model without a dynamic batch dimension runs one request at a time.
        self.max_rows = min(config.max_batch_size, runtime.max_batch_size) if runtime.max_batch_size else 1
        # A fast model runs on the event loop. Without a queue delay a callback per loop
        # iteration runs it; with one, the loop task waits for company, then runs it inline.
        self.fast = runtime.batch_seconds < INLINE_SECONDS
        self.inline = self.fast and not config.max_queue_delay_us
        self._scheduled = False
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{model}-{version}")
        self._labels = (model, str(version))
        self._depth = QUEUE_DEPTH.labels(*self._labels)
        self._batch_rows = BATCH_ROWS.labels(*self._labels)
        self._compute = COMPUTE_SECONDS.labels(*self._labels)
        self.stats = Stats()
        # Inline batches run from _drain_inline callbacks; only the other modes need the loop task.
        self._task = None if self.inline else asyncio.get_running_loop().create_task(
            self._loop(), name=f"batcher-{model}-{version}")

    async def infer(self, feeds: dict[str, np.ndarray], rows: int) -> list[np.ndarray]:
        """Queue one request (already checked against the signature); return its outputs."""
        if len(self._queue) >= self.config.max_queue_size:
            raise ResourceExhausted(f"model {self._labels[0]} version {self._labels[1]}: queue is full "
                                    f"({self.config.max_queue_size} requests waiting); retry later")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(feeds, rows, fut, time.perf_counter()))
        if not self.inline:
            self._wake.set()
        elif not self._scheduled:
            # One callback per batch, after the handlers that are ready in this loop iteration
            # have queued their requests: they form the batch.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._drain_inline)
        return await fut

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(ResourceExhausted("model unloaded while the request waited"))
        self._queue.clear()
        self._executor.shutdown(wait=False)

    # -- the loop ------------------------------------------------------------------------------
    def _take(self) -> list[_Pending]:
        batch, rows = [], 0
        while self._queue and (not batch or rows + self._queue[0].rows <= self.max_rows):
            p = self._queue.popleft()
            if p.future.cancelled():  # the caller gave up while queued
                continue
            batch.append(p)
            rows += p.rows
        return batch

    def _drain_inline(self) -> None:
        self._scheduled = False
        while self._queue:
            batch = self._take()
            if batch:
                self._execute(batch)

    def _execute(self, batch: list[_Pending]) -> None:
        """Run one batch inline and answer its requests."""
        self._depth.set(len(self._queue))  # sampled once per batch, not counted per request
        started = time.perf_counter()
        try:
            outputs = self._run(batch)
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._account(batch, started, time.perf_counter())
        self._answer(batch, outputs)

    @staticmethod
    def _fail(batch: list[_Pending], exc: Exception) -> None:
        """The model failed: every request of the batch learns it."""
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)

    @staticmethod
    def _answer(batch: list[_Pending], outputs: list[np.ndarray]) -> None:
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
            return
        offset = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result([o[offset:offset + p.rows] for o in outputs])
            offset += p.rows

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.config.max_queue_delay_us / 1e6
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if delay and self.max_rows > 1:
                deadline = self._queue[0].enqueued + delay
                while sum(p.rows for p in self._queue) < self.max_rows and (left := deadline - time.perf_counter()) > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            if self.fast:
                self._execute(batch)
                continue
            self._depth.set(len(self._queue))
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:
                self._fail(batch, exc)
                continue
            self._account(batch, started, time.perf_counter())
            self._answer(batch, outputs)

    def _run(self, batch: list[_Pending]) -> list[np.ndarray]:
        if len(batch) == 1:
            return self.runtime.run(batch[0].feeds)
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        return self.runtime.run(feeds)

    def _account(self, batch: list[_Pending], started: float, finished: float) -> None:
        rows = sum(p.rows for p in batch)
        self._batch_rows.observe(rows)
        self._compute.observe(finished - started)
        s = self.stats
        s.inference_count += rows
        s.execution_count += 1
        s.compute_ns += int((finished - started) * 1e9)
        s.queue_ns += int(sum(started - p.enqueued for p in batch) * 1e9)
        s.last_inference_ms = int(time.time() * 1000)
