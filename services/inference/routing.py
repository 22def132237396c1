"""The serving side of endpoints: routes (one immutable object per applied policy revision),
the choice of a version per request, shadow scoring, per-target statistics, the canary guard,
and the watcher that brings every serving process to the newest revision.

Atomic switches: a request reads `routes[endpoint]` once and is served entirely by that
revision; a new revision replaces the object in one assignment, and only after every model it
names is loaded and warmed, so no request waits for a load or sees a mix of two policies.
Across processes, a change returns to its caller once every live process reports that it
serves the new revision.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import random
import time
import zlib
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

from services.common.errors import (
    Aborted, FailedPrecondition, NotFound, StrataError, Unavailable, quote,
)
from services.inference.batching import BatchingConfig
from services.inference.endpoints import LATENCY_BUCKETS_MS, EndpointStore, p99_ms
from services.inference.entities import PolicyBatching, TargetStats, TrafficPolicy
from services.inference.governance import drain_canary, require_approved
from services.inference.model_store import LoadedModel, ModelRef, ModelStore
from services.inference.predlog import PredictionLog

log = logging.getLogger("strata.inference.routing")

PREDICTIONS = Counter("strata_inference_predictions", "Predictions by endpoint, version and outcome",
                      ["endpoint", "model", "version", "outcome"])
PREDICTION_LATENCY = Histogram("strata_inference_prediction_seconds", "Queue + compute time per request",
                               ["endpoint", "model", "version"],
                               buckets=(.0005, .001, .002, .003, .005, .0075, .01, .015, .025, .05, .1, .25, 1))
SHADOW_SKIPPED = Counter("strata_inference_shadow_skipped", "Shadow runs skipped because too many were pending",
                         ["endpoint"])


class ModelFailed(StrataError):
    """The model raised while computing (a server-side error, counted against the version)."""


@dataclass(frozen=True)
class Route:
    endpoint: str
    revision: int
    policy: TrafficPolicy
    targets: tuple[ModelRef, ...]
    cumulative: tuple[int, ...]
    shadows: tuple[ModelRef, ...]
    batching: BatchingConfig

    @classmethod
    def build(cls, endpoint: str, revision: int, policy: TrafficPolicy, default: BatchingConfig) -> Route:
        cum, total = [], 0
        for tg in policy.targets:
            total += tg.weight
            cum.append(total)
        b = policy.batching or PolicyBatching()
        batching = BatchingConfig(max_batch_size=b.max_batch_size or default.max_batch_size,
                                  max_queue_delay_us=b.max_queue_delay_us if b.max_batch_size or b.max_queue_delay_us
                                  else default.max_queue_delay_us,
                                  max_queue_size=b.max_queue_size or default.max_queue_size)
        return cls(endpoint, revision, policy, tuple(ModelRef(tg.model, tg.version) for tg in policy.targets),
                   tuple(cum), tuple(ModelRef(s.model, s.version) for s in policy.shadows), batching)

    def pick(self, routing_key: str) -> ModelRef:
        """Weighted choice; with a routing key and a sticky policy the same key always lands on
        the same bucket (crc32), so it keeps its version while the weights stay the same."""
        total = self.cumulative[-1]
        x = (zlib.crc32(routing_key.encode()) % total if routing_key and self.policy.sticky
             else random.randrange(total))
        return self.targets[bisect.bisect_right(self.cumulative, x)]


@dataclass(slots=True)
class Result:
    ref: ModelRef
    revision: int
    outputs: list[tuple[str, np.ndarray]]
    latency_ms: float


def target_key(ref: ModelRef, shadow: bool) -> str:
    return f"{ref.model}:{ref.version}" + (":shadow" if shadow else "")


class _Stats:
    """Cumulative per (endpoint, revision, target) figures of this process."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int, str], list] = {}
        self.dirty = False

    def observe(self, endpoint: str, revision: int, key: str, ms: float, error: bool) -> None:
        row = self.rows.get((endpoint, revision, key))
        if row is None:
            row = self.rows[(endpoint, revision, key)] = [0, 0, [0] * len(LATENCY_BUCKETS_MS)]
        row[0] += 1
        if error:
            row[1] += 1
        row[2][bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.dirty = True


class Engine:
    def __init__(self, store: ModelStore, endpoints: EndpointStore, predlog: PredictionLog, *,
                 worker_id: str, default_batching: BatchingConfig, poll_seconds: float = 0.2,
                 report_seconds: float = 1.0, max_pending_shadows: int = 256) -> None:
        self.store = store
        self.endpoints = endpoints
        self.predlog = predlog
        self.worker_id = worker_id
        self.default_batching = default_batching
        self.routes: dict[str, Route] = {}
        self.failures: dict[str, str] = {}  # endpoint -> why its newest revision is not applied here
        self._failed_at: dict[str, tuple[int, float]] = {}
        self._poll = poll_seconds
        self._report = report_seconds
        self._stats = _Stats()
        self._shadows: set[asyncio.Task] = set()
        self._max_shadows = max_pending_shadows
        self._task: asyncio.Task | None = None
        self._sync_lock = asyncio.Lock()
        self._metric_children: dict[tuple[str, ModelRef], tuple] = {}
        store.pinned = self._pinned

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.sync()
        await asyncio.to_thread(self._report_once)
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="policy-watcher")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for t in list(self._shadows):
            t.cancel()
        try:
            await asyncio.to_thread(self.endpoints.forget_worker, self.worker_id)
        except Exception:  # the database may be gone at shutdown; the heartbeat expires anyway
            log.warning("could not deregister the serving process", exc_info=True)

    async def _watch(self) -> None:
        last_report = time.monotonic()
        while True:
            await asyncio.sleep(self._poll)
            try:
                await self.sync()
                if time.monotonic() - last_report >= self._report:
                    last_report = time.monotonic()
                    await asyncio.to_thread(self._report_once)
                    await self._guard_canaries()
            except Exception:
                log.exception("policy watcher round failed; retrying")

    def _pinned(self) -> set[ModelRef]:
        return {ref for r in self.routes.values() for ref in (*r.targets, *r.shadows)}

    # -- applying revisions ------------------------------------------------------------------
    async def sync(self) -> None:
        async with self._sync_lock:
            pointers = await asyncio.to_thread(self.endpoints.pointers)
            for name in [n for n in self.routes if n not in pointers]:
                del self.routes[name]
                self.failures.pop(name, None)
            for name, revision in pointers.items():
                current = self.routes.get(name)
                if current is not None and current.revision == revision:
                    continue
                failed = self._failed_at.get(name)
                if failed and failed[0] == revision and time.monotonic() - failed[1] < 5:
                    continue  # retry a failed load every few seconds, not every poll
                await self._apply(name, revision)

    async def _apply(self, name: str, revision: int) -> None:
        policy = await asyncio.to_thread(self.endpoints.policy_at, name, revision)
        try:
            for ref in {ModelRef(t.model, t.version) for t in (*policy.targets, *policy.shadows)}:
                await self.store.load(ref)
        except StrataError as e:
            self.failures[name] = f"revision {revision}: {e.message}"
            self._failed_at[name] = (revision, time.monotonic())
            log.error("cannot apply policy revision", extra={"fields": {"endpoint": name, "revision": revision,
                                                                       "error": e.message}})
            return
        self.routes[name] = Route.build(name, revision, policy, self.default_batching)
        self.failures.pop(name, None)
        self._failed_at.pop(name, None)
        log.info("policy applied", extra={"fields": {"endpoint": name, "revision": revision}})

    def _report_once(self) -> None:
        applied = {n: r.revision for n, r in self.routes.items()}
        dirty, self._stats.dirty = self._stats.dirty, False
        rows = [(e, rev, key, v[0], v[1], list(v[2])) for (e, rev, key), v in list(self._stats.rows.items())] \
            if dirty else []
        try:
            self.endpoints.report(self.worker_id, os.getpid(), applied, self.failures, rows)
        except BaseException:
            self._stats.dirty = self._stats.dirty or dirty  # not saved: the next round tries again
            raise
        if dirty:
            current = {(n, r.revision) for n, r in self.routes.items()}
            for k in [k for k in self._stats.rows if (k[0], k[1]) not in current]:
                del self._stats.rows[k]  # saved for the last time; the revision is gone

    async def report(self) -> None:
        """Write this process's heartbeat and statistics now."""
        await asyncio.to_thread(self._report_once)

    async def publish(self, name: str, revision: int, timeout: float = 120.0) -> None:
        """Apply a revision here at once, then wait until every live serving process serves it."""
        await self.sync()
        await asyncio.to_thread(self._report_once)
        deadline = time.monotonic() + timeout
        while True:
            workers = await asyncio.to_thread(self.endpoints.live_workers, max(3 * self._report, 3.0))
            behind = [w for w, applied, _ in workers if applied.get(name, 0) < revision]
            failed = [f"{w}: {fails[name]}" for w, applied, fails in workers
                      if applied.get(name, 0) < revision and f"revision {revision}:" in fails.get(name, "")]
            if failed:
                raise FailedPrecondition(f"endpoints/{name} revision {revision} is stored but could not be applied "
                                         f"everywhere: {'; '.join(failed)}")
            if not behind:
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"endpoints/{name} revision {revision} is stored; serving processes "
                                  f"{', '.join(behind)} have not applied it yet")
            await asyncio.sleep(self._poll / 2)

    async def _guard_canaries(self) -> None:
        for route in list(self.routes.values()):
            c = route.policy.canary
            if c is None:
                continue
            ref = route.targets[c.target_index]
            stats = await asyncio.to_thread(self.endpoints.stats, route.endpoint, route.revision)
            requests, errors, hist = stats.get(target_key(ref, False), (0, 0, []))
            if requests < max(c.min_requests, 1):
                continue
            rate, p99 = errors / requests, p99_ms(hist)
            why = ""
            if c.max_error_rate and rate > c.max_error_rate:
                why = f"error rate {rate:.3f} > {c.max_error_rate:g}"
            elif c.max_p99_ms and p99 > c.max_p99_ms:
                why = f"p99 {p99:g} ms > {c.max_p99_ms:g} ms"
            if not why:
                continue
            reason = (f"automatic canary rollback: {ref.model} version {ref.version} {why} "
                      f"over {requests} requests")
            try:
                reason = await self._roll_back_canary(route, reason)
            except (Aborted, FailedPrecondition, NotFound):
                continue  # another process rolled back first, or the endpoint changed
            log.warning("canary rolled back", extra={"fields": {"endpoint": route.endpoint, "reason": reason}})
            await self.sync()

    async def _roll_back_canary(self, route: Route, reason: str) -> str:
        """Back to the previous revision's policy; on a production endpoint only if that policy
        routes to approved versions. Otherwise (or when the registry cannot say) the canary is
        drained instead: the current policy without the canary target, whose other targets passed
        the check when it was set. Returns the reason recorded."""
        name, revision = route.endpoint, route.revision
        production = (await asyncio.to_thread(self.endpoints.get, name)).production
        if production:
            try:
                if revision <= 1:
                    raise FailedPrecondition(f"endpoints/{name} has no earlier policy to roll back to")
                previous = await asyncio.to_thread(self.endpoints.policy_at, name, revision - 1)
                await require_approved(previous, self.store.approved_versions, endpoint=name,
                                       source=f"the policy of revision {revision - 1}")
            except (FailedPrecondition, Unavailable) as e:
                drained = drain_canary(route.policy)
                if drained is None:
                    log.error("canary over its limits is neither rolled back nor drained", extra={"fields": {
                        "endpoint": name, "reason": reason, "why": e.message}})
                    raise FailedPrecondition(f"endpoints/{name}: the canary cannot be rolled back "
                                             f"({e.message}) nor drained (no other target takes traffic)") from None
                reason += f"; canary drained instead of a rollback to revision {revision - 1} ({e.message})"
                await asyncio.to_thread(self.endpoints.set_policy, name, drained, "strata-canary-guard",
                                        expected_revision=revision, reason=reason, approved=True)
                return reason
        await asyncio.to_thread(self.endpoints.rollback, name, "strata-canary-guard",
                                expected_revision=revision, reason=reason, approved=production)
        return reason

    # -- predictions (the data plane, dataplane.py, picks the model and decodes the inputs) ---------
    def route(self, endpoint: str) -> Route:
        """The route a request to `endpoint` is served by, entirely (read once per request)."""
        route = self.routes.get(endpoint)
        if route is None:
            raise NotFound(f"endpoints/{quote(endpoint, bare=True)} not found"
                           + (f" ({self.failures[endpoint]})" if endpoint in self.failures else ""))
        return route

    async def serve(self, route: Route, model: LoadedModel, feeds: dict[str, np.ndarray], request_id: str) -> Result:
        """Score `feeds` with `model` (a target `route` picked) and run the route's shadows."""
        rows = model.runtime.check(feeds)
        result = await self._score(route.endpoint, route.revision, route.batching, model, feeds, rows,
                                   request_id, shadow=False)
        for s in route.shadows:
            self._spawn_shadow(route, s, feeds, request_id)
        return result

    async def infer_model(self, model: LoadedModel, feeds: dict[str, np.ndarray], request_id: str) -> Result:
        """A direct model call (V2 protocol without an endpoint)."""
        rows = model.runtime.check(feeds)
        return await self._score("", 0, self.default_batching, model, feeds, rows, request_id, shadow=False)

    async def _score(self, endpoint: str, revision: int, batching: BatchingConfig, model: LoadedModel,
                     feeds: dict[str, np.ndarray], rows: int, request_id: str, *, shadow: bool) -> Result:
        ref = model.ref
        started = time.perf_counter()
        error, done = "", False
        try:
            outputs = await model.batcher(batching).infer(feeds, rows)
            done = True
        except StrataError as e:  # refused (the queue is full, the model is going away): an error answered
            error = e.message
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            raise ModelFailed(f"models/{ref.model}/versions/{ref.version} failed: {e}") from e
        finally:
            ms = (time.perf_counter() - started) * 1000
            # Neither done nor an error: cancelled (the caller went away), so not answered, not
            # logged and not counted: the predictions counted are the predictions logged.
            if done or error:
                if endpoint:
                    self._stats.observe(endpoint, revision, target_key(ref, shadow), ms, bool(error))
                ok_count, err_count, latency = self._metrics(endpoint, ref)
                (err_count if error else ok_count).inc()
                latency.observe(ms / 1000)
            if error:
                self.predlog.record((time.time(), request_id, endpoint, ref.model, ref.version, revision, shadow,
                                     ms, feeds, [], error))
        named = list(zip(model.runtime.output_names, outputs, strict=True))
        self.predlog.record((time.time(), request_id, endpoint, ref.model, ref.version, revision, shadow, ms,
                             feeds, named, ""))
        return Result(ref, revision, named, ms)

    def _metrics(self, endpoint: str, ref: ModelRef) -> tuple:
        """Metric children per (endpoint, version), looked up once (labels() costs microseconds)."""
        key = (endpoint, ref)
        m = self._metric_children.get(key)
        if m is None:
            labels = (endpoint, ref.model, str(ref.version))
            m = self._metric_children[key] = (PREDICTIONS.labels(*labels, "ok"), PREDICTIONS.labels(*labels, "error"),
                                              PREDICTION_LATENCY.labels(*labels))
        return m

    def _spawn_shadow(self, route: Route, ref: ModelRef, feeds: dict[str, np.ndarray], request_id: str) -> None:
        if len(self._shadows) >= self._max_shadows:
            SHADOW_SKIPPED.labels(route.endpoint).inc()
            return
        task = asyncio.get_running_loop().create_task(self._shadow(route, ref, feeds, request_id))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, route: Route, ref: ModelRef, feeds: dict[str, np.ndarray], request_id: str) -> None:
        model = self.store.get(ref)
        try:
            if model is None:
                model = await self.store.load(ref)
            rows = model.runtime.check(feeds)
            await self._score(route.endpoint, route.revision, route.batching, model, feeds, rows, request_id,
                              shadow=True)
        except Exception as e:  # a shadow never affects the caller; its failure is logged and counted
            log.warning("shadow scoring failed", extra={"fields": {
                "endpoint": route.endpoint, "model": ref.model, "version": ref.version, "error": str(e),
                "request_id": request_id}})

    def endpoint_stats(self, endpoint: str, revision: int) -> list[TargetStats]:
        stats = self.endpoints.stats(endpoint, revision)
        out = []
        for key, (requests, errors, hist) in sorted(stats.items()):
            model, version, *shadow = key.split(":")
            out.append(TargetStats(model, int(version), bool(shadow), requests, errors, p99_ms(hist)))
        return out

