"""Endpoints and their traffic-policy revisions (the durable, shared part).

Every change -- create, set, rollback, automatic canary rollback -- appends a revision and moves
the endpoint's `revision` pointer in one transaction, guarded by the revision the caller saw, so
two concurrent changes cannot both win. Serving processes poll the pointers and apply new
revisions (see routing.py).

A production endpoint's policy must have been checked against the registry's approvals
(governance.py) by the caller; the store keeps the flag and refuses a policy change that was not
checked when the endpoint is (or has meanwhile become) production.

Per-target statistics are kept for the newest `keep_revisions` revisions of each endpoint: a
policy change drops the older ones of its endpoint, and `prune_stats` (on a schedule, app.py)
also drops what a serving process reported after its endpoint was deleted and the heartbeats of
processes long gone, so neither table grows without bound.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError

from services.common.db import Database
from services.common.errors import (
    Aborted, AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, quote,
)
from services.common.idempotency import RequestIds, check_request_id
from services.common.limits import check_version
from services.common.paging import PageRequest
from services.common.timeutil import as_utc
from services.inference import tables as t
from services.inference.entities import PolicyBatching, TrafficPolicy, policy_from_json, policy_to_dict, policy_to_json

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
MAX_BATCH_SIZE = 4096
MAX_QUEUE_SIZE = 100_000
MAX_QUEUE_DELAY_US = 1_000_000
STATS_KEEP_REVISIONS = 5  # per endpoint: the current revision and the four before it
WORKER_TTL_SECONDS = 3600.0  # a serving process silent this long is gone (crashed, never deregistered)

# Latency histogram of the canary statistics (upper bounds, ms; the last is +inf).
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500,
                      float("inf"))


@dataclass(frozen=True)
class EndpointRecord:
    name: str
    description: str
    revision: int
    policy: TrafficPolicy
    created_by: str
    create_time: datetime
    update_time: datetime
    production: bool = False


@dataclass(frozen=True)
class RevisionRecord:
    revision: int
    policy: TrafficPolicy
    created_by: str
    create_time: datetime
    reason: str


def validate_name(name: str, field: str = "endpoint.name") -> None:
    if not NAME_RE.match(name):
        raise InvalidArgument(field, f"{quote(name)} is not a valid name ([a-z0-9][a-z0-9._-]{{0,62}})")


def validate_policy(policy: TrafficPolicy, field: str = "policy") -> None:
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
            check_version(tg.version, f"{f}.version", optional=True)
            if tg.weight < 0:
                raise InvalidArgument(f"{f}.weight", "must not be negative")
            key = (tg.model, tg.version, tg.alias)
            if key in seen:
                raise InvalidArgument(f, f"{tg.model} {tg.version or tg.alias} is listed twice")
            seen.add(key)
    if sum(tg.weight for tg in policy.targets) <= 0:
        raise InvalidArgument(f"{field}.targets", "the weights must add up to more than 0")
    if policy.canary is not None:
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
    b = policy.batching or PolicyBatching()
    if not 0 <= b.max_batch_size <= MAX_BATCH_SIZE:
        raise InvalidArgument(f"{field}.batching.max_batch_size", f"must be within 0..{MAX_BATCH_SIZE}")
    if not 0 <= b.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
        raise InvalidArgument(f"{field}.batching.max_queue_delay_us", f"must be within 0..{MAX_QUEUE_DELAY_US}")
    if not 0 <= b.max_queue_size <= MAX_QUEUE_SIZE:
        raise InvalidArgument(f"{field}.batching.max_queue_size", f"must be within 0..{MAX_QUEUE_SIZE}")


_request_ids = RequestIds(t.idempotency_keys)


def create_payload(name: str, description: str, policy: TrafficPolicy, production: bool) -> dict:
    """What a retried CreateEndpoint must repeat for its request id to answer the first result.
    (Digested and stored: the policy's dict must never change; migration 0005 re-digested the
    request ids recorded while the payload held the policy's protobuf bytes.)"""
    return {"name": name, "description": description, "production": production, "policy": policy_to_dict(policy)}


class EndpointStore:
    def __init__(self, db: Database, keep_revisions: int = STATS_KEEP_REVISIONS) -> None:
        self.db = db
        if keep_revisions < 1:
            raise ValueError("keep_revisions must be at least 1 (the current revision)")
        self.keep_revisions = keep_revisions

    # -- reads -------------------------------------------------------------------------------
    def get(self, name: str) -> EndpointRecord:
        with self.db.read() as c:
            row = c.execute(select(t.endpoints).where(t.endpoints.c.name == name)).one_or_none()
            if row is None:
                raise NotFound(f"endpoints/{quote(name, bare=True)} not found")
            rev = self._revision(c, name, row.revision)
        return EndpointRecord(row.name, row.description, row.revision, rev.policy, row.created_by,
                              row.create_time, row.update_time, bool(row.production))

    def list(self, size: int = 0, token: str = "") -> tuple[list[EndpointRecord], str]:
        """One page of endpoints by name, and the next page's token (services/common/paging.py)."""
        page = PageRequest.parse("ListEndpoints", size, token, key=str)
        stmt = select(t.endpoints.c.name).order_by(t.endpoints.c.name).limit(page.limit)
        if page.after is not None:
            stmt = stmt.where(t.endpoints.c.name > page.after)
        with self.db.read() as c:
            names, next_token = page.cut(c.execute(stmt).scalars().all(), lambda n: n)
        return [self.get(n) for n in names], next_token

    def revisions(self, name: str, size: int = 0, token: str = "") -> tuple[list[RevisionRecord], str]:
        """One page of an endpoint's policy revisions, newest first, and the next page's token."""
        page = PageRequest.parse("ListPolicyRevisions", size, token, {"endpoint": name}, key=int)
        self.get(name)
        r = t.policy_revisions.c
        stmt = select(t.policy_revisions).where(r.endpoint == name).order_by(r.revision.desc()).limit(page.limit)
        if page.after is not None:
            stmt = stmt.where(r.revision < page.after)
        with self.db.read() as c:
            rows, next_token = page.cut(c.execute(stmt).all(), lambda row: row.revision)
        return [_revision_record(row) for row in rows], next_token

    def pointers(self) -> dict[str, int]:
        """{endpoint: current revision}: what serving processes poll (one small query)."""
        with self.db.read() as c:
            return dict(c.execute(select(t.endpoints.c.name, t.endpoints.c.revision)).all())

    def policy_at(self, name: str, revision: int) -> TrafficPolicy:
        with self.db.read() as c:
            return self._revision(c, name, revision).policy

    @staticmethod
    def _revision(c, name: str, revision: int) -> RevisionRecord:  # noqa: ANN001
        row = c.execute(select(t.policy_revisions).where(
            t.policy_revisions.c.endpoint == name, t.policy_revisions.c.revision == revision)).one()
        return _revision_record(row)

    # -- changes -----------------------------------------------------------------------------
    def created(self, principal: str, request_id: str, payload: dict) -> EndpointRecord | None:
        """The endpoint a first CreateEndpoint with this request id made (None: no id, or not seen);
        INVALID_ARGUMENT naming request_id when it carried another payload (`create_payload`)."""
        check_request_id(request_id)
        with self.db.read() as c:
            prior = _request_ids.lookup(c, principal, "CreateEndpoint", request_id, payload)
        return None if prior is None else self.get(prior)

    def create(self, name: str, description: str, policy: TrafficPolicy, principal: str,
               request_id: str = "", *, production: bool = False, payload: dict | None = None) -> EndpointRecord:
        """`production`: the caller has checked the policy against the registry's approvals.
        `payload`: what a retry with request_id must repeat (`create_payload` of the request as
        given, before aliases were resolved; by default of these arguments). A retry returns the
        first call's endpoint (services/common/idempotency.py)."""
        validate_name(name)
        validate_policy(policy, "endpoint.policy")
        check_request_id(request_id)
        if payload is None:
            payload = create_payload(name, description, policy, production)
        now = datetime.now(UTC)
        try:
            with self.db.session() as c:
                prior = _request_ids.lookup(c, principal, "CreateEndpoint", request_id, payload)
                if prior is None:
                    c.execute(insert(t.endpoints).values(
                        name=name, description=description, revision=1, created_by=principal,
                        create_time=now, update_time=now, production=production))
                    c.execute(insert(t.policy_revisions).values(
                        endpoint=name, revision=1, policy=policy_to_json(policy),
                        created_by=principal, reason="created", create_time=now))
                    _request_ids.remember(c, principal, "CreateEndpoint", request_id, payload, name)
        except IntegrityError:
            # The name is taken, or a concurrent call with the same request id got there first.
            if (first := self.created(principal, request_id, payload)) is not None:
                return first
            raise AlreadyExists(f"endpoints/{name} already exists") from None
        return self.get(prior or name)

    def set_policy(self, name: str, policy: TrafficPolicy, principal: str, *, expected_revision: int = 0,
                   reason: str = "", approved: bool = False) -> EndpointRecord:
        """`approved`: the caller has checked the policy against the registry's approvals (needed
        when the endpoint is production)."""
        validate_policy(policy)
        return self._append(name, policy, principal, expected_revision, reason or "set", approved)

    def rollback(self, name: str, principal: str, *, expected_revision: int = 0, reason: str = "",
                 approved: bool = False) -> EndpointRecord:
        """Appends the previous revision's policy. `approved`: the caller has checked that policy
        (the one of revision expected_revision - 1) against the registry's approvals."""
        current = self.get(name)
        if current.revision <= 1:
            raise FailedPrecondition(f"endpoints/{name} has no earlier policy to roll back to")
        previous = self.policy_at(name, current.revision - 1)
        return self._append(name, previous, principal, expected_revision or current.revision,
                            reason or f"rollback to the policy of revision {current.revision - 1}", approved)

    def _append(self, name: str, policy: TrafficPolicy, principal: str, expected: int, reason: str,
                approved: bool) -> EndpointRecord:
        now = datetime.now(UTC)
        e = t.endpoints.c
        with self.db.session() as c:
            row = c.execute(select(e.revision, e.production).where(e.name == name)).one_or_none()
            if row is None:
                raise NotFound(f"endpoints/{quote(name, bare=True)} not found")
            current = row.revision
            if expected and current != expected:
                raise Aborted(f"endpoints/{name} is at revision {current}, not {expected}; re-read and retry")
            if row.production and not approved:
                raise Aborted(f"endpoints/{name} is a production endpoint (marked so meanwhile?): its policy "
                              "must be checked against the registry's approvals; retry")
            moved = c.execute(update(t.endpoints).where(e.name == name, e.revision == current)
                              .values(revision=current + 1, update_time=now)).rowcount
            if moved != 1:
                raise Aborted(f"endpoints/{name} changed concurrently; re-read and retry")
            c.execute(insert(t.policy_revisions).values(
                endpoint=name, revision=current + 1, policy=policy_to_json(policy),
                created_by=principal, reason=reason, create_time=now))
            # The right moment to forget the statistics of revisions that fell out of the window.
            s = t.target_stats.c
            c.execute(delete(t.target_stats).where(s.endpoint == name,
                                                   s.revision <= current + 1 - self.keep_revisions))
        return self.get(name)

    def update(self, name: str, *, description: str | None = None, production: bool | None = None,
               checked_revision: int = 0) -> EndpointRecord:
        """Change the description and/or the production flag. Marking an endpoint production needs
        `checked_revision`: the revision whose policy the caller checked against the registry's
        approvals; if the policy changed since, ABORTED (re-check and retry)."""
        e = t.endpoints.c
        values: dict[str, object] = {}
        if description is not None:
            values["description"] = description
        if production is not None:
            values["production"] = production
        with self.db.session() as c:
            row = c.execute(select(e.revision, e.production).where(e.name == name)).one_or_none()
            if row is None:
                raise NotFound(f"endpoints/{quote(name, bare=True)} not found")
            if values:
                stmt = update(t.endpoints).where(e.name == name)
                if production and not row.production:
                    if not checked_revision:
                        raise FailedPrecondition(f"endpoints/{name}: its policy must be checked against the "
                                                 "registry's approvals before it is marked production")
                    stmt = stmt.where(e.revision == checked_revision)
                if c.execute(stmt.values(**values)).rowcount != 1:
                    raise Aborted(f"endpoints/{name} changed its policy while it was being marked production; "
                                  "retry")
        return self.get(name)

    def delete(self, name: str, *, production_allowed: bool = True) -> None:
        """`production_allowed`: whether the caller may delete a production endpoint (the approver
        role; PERMISSION_DENIED otherwise)."""
        e = t.endpoints.c
        with self.db.session() as c:
            row = c.execute(select(e.production).where(e.name == name)).one_or_none()
            if row is None:
                raise NotFound(f"endpoints/{quote(name, bare=True)} not found")
            if row.production and not production_allowed:
                raise PermissionDenied(f"endpoints/{name} is a production endpoint: deleting it needs role "
                                       "approver")
            if not c.execute(delete(t.endpoints).where(e.name == name)).rowcount:
                raise NotFound(f"endpoints/{quote(name, bare=True)} not found")
            c.execute(delete(t.policy_revisions).where(t.policy_revisions.c.endpoint == name))
            c.execute(delete(t.target_stats).where(t.target_stats.c.endpoint == name))
            _request_ids.forget(c, "CreateEndpoint", [name])  # a retry of its create makes a new one

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
                if as_utc(r.heartbeat).timestamp() >= since]

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

    def prune_stats(self, worker_ttl_seconds: float = WORKER_TTL_SECONDS) -> tuple[int, int]:
        """Drop the statistics of every endpoint's revisions older than the newest
        `keep_revisions` and of endpoints that no longer exist (a serving process reports its last
        figures after a delete), and the heartbeats of serving processes silent for
        `worker_ttl_seconds`. One statement per table; returns the rows removed from each."""
        s, e = t.target_stats.c, t.endpoints.c
        kept = exists().where(and_(e.name == s.endpoint, s.revision > e.revision - self.keep_revisions))
        cutoff = datetime.now(UTC) - timedelta(seconds=worker_ttl_seconds)
        with self.db.session() as c:
            stats = c.execute(delete(t.target_stats).where(~kept)).rowcount
            workers = c.execute(delete(t.workers).where(t.workers.c.heartbeat < cutoff)).rowcount
        return stats, workers


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


def _revision_record(row) -> RevisionRecord:  # noqa: ANN001
    return RevisionRecord(row.revision, policy_from_json(row.policy), row.created_by, row.create_time, row.reason)
