"""Endpoints and their traffic-policy revisions (the durable, shared part).

Every change -- create, set, rollback, automatic canary rollback -- appends a revision and moves
the endpoint's `revision` pointer in one transaction, guarded by the revision the caller saw, so
two concurrent changes cannot both win. Serving processes poll the pointers and apply new
revisions (see routing.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from strata.inference.v1 import inference_pb2 as pb

from services.common.db import Database
from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.inference import tables as t

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
MAX_BATCH_SIZE = 4096
MAX_QUEUE_SIZE = 100_000
MAX_QUEUE_DELAY_US = 1_000_000

# Latency histogram of the canary statistics (upper bounds, ms; the last is +inf).
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500,
                      float("inf"))


@dataclass(frozen=True)
class EndpointRecord:
    name: str
    description: str
    revision: int
    policy: pb.TrafficPolicy
    created_by: str
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class RevisionRecord:
    revision: int
    policy: pb.TrafficPolicy
    created_by: str
    create_time: datetime
    reason: str


def validate_policy(policy: pb.TrafficPolicy, field: str = "policy") -> None:
    """Everything that can be checked without the registry. A stored policy keeps the alias a
    target was resolved from beside its version (the servicer refuses both on input)."""
    if not policy.targets:
        raise InvalidArgument(f"{field}.targets", "at least one target is required")
    for kind in ("targets", "shadows"):
        seen = set()
        for i, tg in enumerate(getattr(policy, kind)):
            f = f"{field}.{kind}[{i}]"
            if not tg.model:
                raise InvalidArgument(f"{f}.model", "model name is required")
            if tg.version < 0:
                raise InvalidArgument(f"{f}.version", "must be positive (or 0 with an alias)")
            if tg.weight < 0:
                raise InvalidArgument(f"{f}.weight", "must not be negative")
            key = (tg.model, tg.version, tg.alias)
            if key in seen:
                raise InvalidArgument(f, f"{tg.model} {tg.version or tg.alias} is listed twice")
            seen.add(key)
    if sum(tg.weight for tg in policy.targets) <= 0:
        raise InvalidArgument(f"{field}.targets", "the weights must add up to more than 0")
    if policy.HasField("canary"):
        c = policy.canary
        if not 0 <= c.target_index < len(policy.targets):
            raise InvalidArgument(f"{field}.canary.target_index",
                                  f"{c.target_index} is not a target index (0..{len(policy.targets) - 1})")
        if not 0 <= c.max_error_rate <= 1:
            raise InvalidArgument(f"{field}.canary.max_error_rate", "must be within 0..1")
        if c.max_p99_ms < 0:
            raise InvalidArgument(f"{field}.canary.max_p99_ms", "must not be negative")
        if c.min_requests < 0:
            raise InvalidArgument(f"{field}.canary.min_requests", "must not be negative")
        if not (c.max_error_rate or c.max_p99_ms):
            raise InvalidArgument(f"{field}.canary", "set max_error_rate or max_p99_ms")
    b = policy.batching
    if not 0 <= b.max_batch_size <= MAX_BATCH_SIZE:
        raise InvalidArgument(f"{field}.batching.max_batch_size", f"must be within 0..{MAX_BATCH_SIZE}")
    if not 0 <= b.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
        raise InvalidArgument(f"{field}.batching.max_queue_delay_us", f"must be within 0..{MAX_QUEUE_DELAY_US}")
    if not 0 <= b.max_queue_size <= MAX_QUEUE_SIZE:
        raise InvalidArgument(f"{field}.batching.max_queue_size", f"must be within 0..{MAX_QUEUE_SIZE}")


class EndpointStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reads -------------------------------------------------------------------------------
    def get(self, name: str) -> EndpointRecord:
        with self.db.read() as c:
            row = c.execute(select(t.endpoints).where(t.endpoints.c.name == name)).one_or_none()
            if row is None:
                raise NotFound(f"endpoints/{name} not found")
            rev = self._revision(c, name, row.revision)
        return EndpointRecord(row.name, row.description, row.revision, rev.policy, row.created_by,
                              row.create_time, row.update_time)

    def list(self, page_size: int = 50, after: str = "") -> list[EndpointRecord]:
        with self.db.read() as c:
            rows = c.execute(select(t.endpoints.c.name).where(t.endpoints.c.name > after)
                             .order_by(t.endpoints.c.name).limit(page_size)).scalars().all()
        return [self.get(n) for n in rows]

    def revisions(self, name: str, limit: int = 50) -> list[RevisionRecord]:
        self.get(name)
        with self.db.read() as c:
            rows = c.execute(select(t.policy_revisions).where(t.policy_revisions.c.endpoint == name)
                             .order_by(t.policy_revisions.c.revision.desc()).limit(limit)).all()
        return [_revision_record(r) for r in rows]

    def pointers(self) -> dict[str, int]:
        """{endpoint: current revision}: what serving processes poll (one small query)."""
        with self.db.read() as c:
            return dict(c.execute(select(t.endpoints.c.name, t.endpoints.c.revision)).all())

    def policy_at(self, name: str, revision: int) -> pb.TrafficPolicy:
        with self.db.read() as c:
            return self._revision(c, name, revision).policy

    @staticmethod
    def _revision(c, name: str, revision: int) -> RevisionRecord:  # noqa: ANN001
        row = c.execute(select(t.policy_revisions).where(
            t.policy_revisions.c.endpoint == name, t.policy_revisions.c.revision == revision)).one()
        return _revision_record(row)

    # -- changes -----------------------------------------------------------------------------
    def create(self, name: str, description: str, policy: pb.TrafficPolicy, principal: str,
               request_id: str = "") -> EndpointRecord:
        if not NAME_RE.match(name):
            raise InvalidArgument("endpoint.name", f"'{name}' is not a valid name ([a-z0-9][a-z0-9._-]{{0,62}})")
        validate_policy(policy, "endpoint.policy")
        now = datetime.now(UTC)
        if request_id:
            with self.db.read() as c:
                prior = c.execute(select(t.endpoints.c.name).where(
                    t.endpoints.c.create_request_id == request_id)).scalar_one_or_none()
            if prior is not None:
                return self.get(prior)
        try:
            with self.db.session() as c:
                c.execute(insert(t.endpoints).values(
                    name=name, description=description, revision=1, created_by=principal,
                    create_request_id=request_id or None, create_time=now, update_time=now))
                c.execute(insert(t.policy_revisions).values(
                    endpoint=name, revision=1, policy=policy.SerializeToString(deterministic=True),
                    created_by=principal, reason="created", create_time=now))
        except IntegrityError:
            raise AlreadyExists(f"endpoints/{name} already exists") from None
        return self.get(name)

    def set_policy(self, name: str, policy: pb.TrafficPolicy, principal: str, *, expected_revision: int = 0,
                   reason: str = "") -> EndpointRecord:
        validate_policy(policy)
        return self._append(name, policy, principal, expected_revision, reason or "set")

    def rollback(self, name: str, principal: str, *, expected_revision: int = 0, reason: str = "") -> EndpointRecord:
        current = self.get(name)
        if current.revision <= 1:
            raise FailedPrecondition(f"endpoints/{name} has no earlier policy to roll back to")
        previous = self.policy_at(name, current.revision - 1)
        return self._append(name, previous, principal, expected_revision or current.revision,
                            reason or f"rollback to the policy of revision {current.revision - 1}")

    def _append(self, name: str, policy: pb.TrafficPolicy, principal: str, expected: int, reason: str) -> EndpointRecord:
        now = datetime.now(UTC)
        with self.db.session() as c:
            current = c.execute(select(t.endpoints.c.revision).where(t.endpoints.c.name == name)).scalar_one_or_none()
            if current is None:
                raise NotFound(f"endpoints/{name} not found")
            if expected and current != expected:
                raise Aborted(f"endpoints/{name} is at revision {current}, not {expected}; re-read and retry")
            moved = c.execute(update(t.endpoints).where(t.endpoints.c.name == name, t.endpoints.c.revision == current)
                              .values(revision=current + 1, update_time=now)).rowcount
            if moved != 1:
                raise Aborted(f"endpoints/{name} changed concurrently; re-read and retry")
            c.execute(insert(t.policy_revisions).values(
                endpoint=name, revision=current + 1, policy=policy.SerializeToString(deterministic=True),
                created_by=principal, reason=reason, create_time=now))
        return self.get(name)

    def delete(self, name: str) -> None:
        with self.db.session() as c:
            if not c.execute(delete(t.endpoints).where(t.endpoints.c.name == name)).rowcount:
                raise NotFound(f"endpoints/{name} not found")
            c.execute(delete(t.policy_revisions).where(t.policy_revisions.c.endpoint == name))
            c.execute(delete(t.target_stats).where(t.target_stats.c.endpoint == name))

    # -- serving processes -------------------------------------------------------------------
    def report(self, worker_id: str, pid: int, applied: dict[str, int], failures: dict[str, str],
               stats: Sequence[tuple[str, int, str, int, int, list[int]]] = ()) -> None:
        """A serving process's heartbeat (what it applied, what failed) and its statistics rows
        (endpoint, revision, target, requests, errors, histogram; cumulative for the process), in
        one transaction of two upserts: this runs every second in every serving process."""
        now = datetime.now(UTC)
        with self.db.session() as c:
            self.db.upsert(c, t.workers, [{"worker_id": worker_id, "pid": pid, "applied": json.dumps(applied),
                                           "failures": json.dumps(failures), "heartbeat": now}], ["worker_id"])
            self.db.upsert(c, t.target_stats, [
                {"endpoint": e, "revision": rev, "target": target, "worker_id": worker_id, "requests": requests,
                 "errors": errors, "histogram": json.dumps(hist), "update_time": now}
                for e, rev, target, requests, errors, hist in stats],
                ["endpoint", "revision", "target", "worker_id"])

    def live_workers(self, within_seconds: float) -> list[tuple[str, dict[str, int], dict[str, str]]]:
        since = datetime.now(UTC).timestamp() - within_seconds
        with self.db.read() as c:
            rows = c.execute(select(t.workers)).all()
        return [(r.worker_id, json.loads(r.applied), json.loads(r.failures)) for r in rows
                if _aware(r.heartbeat).timestamp() >= since]

    def forget_worker(self, worker_id: str) -> None:
        with self.db.session() as c:
            c.execute(delete(t.workers).where(t.workers.c.worker_id == worker_id))

    def stats(self, endpoint: str, revision: int) -> dict[str, tuple[int, int, list[int]]]:
        """{target: (requests, errors, histogram)} summed over serving processes."""
        with self.db.read() as c:
            rows = c.execute(select(t.target_stats).where(t.target_stats.c.endpoint == endpoint,
                                                          t.target_stats.c.revision == revision)).all()
        out: dict[str, tuple[int, int, list[int]]] = {}
        for r in rows:
            req, err, hist = out.get(r.target, (0, 0, [0] * len(LATENCY_BUCKETS_MS)))
            out[r.target] = (req + r.requests, err + r.errors, [a + b for a, b in zip(hist, json.loads(r.histogram),
                                                                                        strict=True)])
        return out

    def prune_stats(self, keep_revisions: int = 5) -> None:
        with self.db.session() as c:
            for name, rev in c.execute(select(t.endpoints.c.name, t.endpoints.c.revision)).all():
                c.execute(delete(t.target_stats).where(t.target_stats.c.endpoint == name,
                                                       t.target_stats.c.revision <= rev - keep_revisions))


def p99_ms(hist: list[int]) -> float:
    total = sum(hist)
    if not total:
        return 0.0
    need, seen = 0.99 * total, 0
    for bound, n in zip(LATENCY_BUCKETS_MS, hist, strict=True):
        seen += n
        if seen >= need:
            return bound
    return LATENCY_BUCKETS_MS[-1]


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _revision_record(row) -> RevisionRecord:  # noqa: ANN001
    policy = pb.TrafficPolicy()
    policy.ParseFromString(row.policy)
    return RevisionRecord(row.revision, policy, row.created_by, row.create_time, row.reason)
