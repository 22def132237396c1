"""Training jobs in the database: submitted (idempotent by request id), listed, cancelled, and
claimed by workers under a lease.

A worker claims the oldest QUEUED job, or a RUNNING one whose lease ran out (its worker died),
and renews the lease while it works (`heartbeat`). Claiming is one transaction: on PostgreSQL the
candidate row is locked with SELECT ... FOR UPDATE SKIP LOCKED, so two workers never take the
same job; on SQLite the transaction holds the database's write lock from BEGIN (services/common/db.py),
which gives the same one-at-a-time claim on one host. Every later write of a worker is conditioned
on still holding the lease, so a worker that lost it (paused past its lease) changes nothing.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict
from datetime import datetime

from sqlalchemy import and_, delete, insert, or_, select, update

from services.common.db import Database
from services.common.errors import FailedPrecondition, NotFound, quote
from services.common.idempotency import RequestIds, check_request_id
from services.common.paging import PageRequest
from services.common.timeutil import as_utc, utc_now
from services.training import tables as t
from services.training.types import Job, JobSpec, JobState, Progress, Result

SUBMIT = "SubmitTrainingJob"


def _job(row) -> Job:
    return Job(job_id=row.job_id, spec=JobSpec.from_dict(row.spec), state=JobState(row.state),
               progress=Progress(**row.progress), result=Result.from_dict(row.result) if row.result else None,
               error=row.error, created_by=row.created_by, create_time=as_utc(row.create_time),
               start_time=as_utc(row.start_time), end_time=as_utc(row.end_time), attempts=row.attempts,
               cancel_requested=row.cancel_requested)


class Lease:
    """A worker's hold on one job: every write goes through it and fails once the hold is gone."""

    def __init__(self, store: JobStore, job: Job, owner: str, mlflow_run_id: str) -> None:
        self.store, self.job, self.owner, self.mlflow_run_id = store, job, owner, mlflow_run_id

    @property
    def job_id(self) -> str:
        return self.job.job_id


class HelperLease:
    """A helper worker's hold on one slot of a job's open search."""

    def __init__(self, job: Job, owner: str, slot: int, mlflow_run_id: str) -> None:
        self.job, self.owner, self.slot, self.mlflow_run_id = job, owner, slot, mlflow_run_id

    @property
    def job_id(self) -> str:
        return self.job.job_id


class LeaseLost(RuntimeError):
    """Another worker holds the job now (this one was too slow to renew its lease)."""


class JobStore:
    def __init__(self, db: Database, lease_seconds: float = 30.0) -> None:
        self.db = db
        self.lease_seconds = lease_seconds
        self.request_ids = RequestIds(t.idempotency_keys)

    # -- the API side --------------------------------------------------------------------------------
    def submit(self, spec: JobSpec, principal: str, request_id: str = "") -> Job:
        check_request_id(request_id)
        with self.db.session() as c:
            return self.submit_in(c, spec, principal, request_id)

    def submit_in(self, c, spec: JobSpec, principal: str, request_id: str = "") -> Job:
        """Submit in the caller's transaction (a schedule's tick submits and advances together)."""
        payload = spec.to_dict()
        first = self.request_ids.lookup(c, principal, SUBMIT, request_id, payload)
        if first is not None:
            return self._get(c, first.removeprefix("training/jobs/"))
        job_id = secrets.token_hex(8)
        now = utc_now()
        c.execute(t.jobs.insert().values(
            job_id=job_id, spec=payload, state=int(JobState.QUEUED), progress=asdict(Progress(stage="queued")),
            result=None, error="", created_by=principal, create_time=now, update_time=now, attempts=0,
            cancel_requested=False, lease_owner="", lease_expires=0.0, mlflow_run_id="", helper_slots=0))
        self.request_ids.remember(c, principal, SUBMIT, request_id, payload, f"training/jobs/{job_id}")
        return self._get(c, job_id)

    def get(self, job_id: str) -> Job:
        with self.db.read() as c:
            return self._get(c, job_id)

    def _get(self, c, job_id: str) -> Job:
        row = c.execute(select(t.jobs).where(t.jobs.c.job_id == job_id)).first()
        if row is None:
            raise NotFound(f"training/jobs/{quote(job_id, bare=True)} does not exist")
        return _job(row)

    def list(self, state: JobState | None, page_size: int, page_token: str) -> tuple[list[Job], str]:
        """Newest first, by (create_time, job_id)."""
        page = PageRequest.parse("ListTrainingJobs", page_size, page_token,
                                 {"state": int(state) if state else 0}, key=list)
        q = select(t.jobs)
        if state:
            q = q.where(t.jobs.c.state == int(state))
        if page.after is not None:
            when, job_id = datetime.fromisoformat(page.after[0]), page.after[1]
            q = q.where(or_(t.jobs.c.create_time < when, and_(t.jobs.c.create_time == when, t.jobs.c.job_id < job_id)))
        q = q.order_by(t.jobs.c.create_time.desc(), t.jobs.c.job_id.desc()).limit(page.limit)
        with self.db.read() as c:
            jobs = [_job(r) for r in c.execute(q)]
        return page.cut(jobs, lambda j: [j.create_time.isoformat(), j.job_id])

    def cancel(self, job_id: str) -> Job:
        """QUEUED -> CANCELLED now; RUNNING -> cancel_requested (its worker stops within its next
        heartbeat); finished -> FAILED_PRECONDITION."""
        with self.db.session() as c:
            job = self._get(c, job_id)
            if job.state.finished:
                raise FailedPrecondition(f"training/jobs/{job_id} already finished ({job.state.name})")
            values: dict = {"cancel_requested": True, "update_time": utc_now()}
            if job.state == JobState.QUEUED:
                values |= {"state": int(JobState.CANCELLED), "end_time": utc_now(),
                           "progress": {**asdict(job.progress), "stage": "cancelled"}}
            c.execute(update(t.jobs).where(t.jobs.c.job_id == job_id).values(**values))
            return self._get(c, job_id)

    # -- the worker side -------------------------------------------------------------------------
    def claim(self, owner: str) -> Lease | None:
        """The oldest job to run (queued, or abandoned by a dead worker), leased to `owner`."""
        now = time.time()
        j = t.jobs.c
        with self.db.session() as c:
            q = (select(t.jobs).where(or_(j.state == int(JobState.QUEUED),
                                          and_(j.state == int(JobState.RUNNING), j.lease_expires < now)))
                 .order_by(j.create_time).limit(1))
            if self.db.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True)
            row = c.execute(q).first()
            if row is None:
                return None
            if row.cancel_requested:  # its worker died after a cancel: finish it here
                c.execute(update(t.jobs).where(j.job_id == row.job_id).values(
                    state=int(JobState.CANCELLED), end_time=utc_now(), update_time=utc_now(), lease_owner=""))
                return None
            c.execute(update(t.jobs).where(j.job_id == row.job_id).values(
                state=int(JobState.RUNNING), lease_owner=owner, lease_expires=now + self.lease_seconds,
                attempts=row.attempts + 1, start_time=utc_now(), update_time=utc_now()))
            job = self._get(c, row.job_id)
        return Lease(self, job, owner, row.mlflow_run_id)

    def _held(self, lease: Lease):
        j = t.jobs.c
        return and_(j.job_id == lease.job_id, j.lease_owner == lease.owner, j.state == int(JobState.RUNNING))

    def heartbeat(self, lease: Lease | HelperLease) -> bool:
        """Renew the lease; True when the work should stop (a cancel was asked; for a helper, also
        the search closed). LeaseLost when another worker has it."""
        if isinstance(lease, HelperLease):
            return self._helper_heartbeat(lease)
        with self.db.session() as c:
            n = c.execute(update(t.jobs).where(self._held(lease)).values(
                lease_expires=time.time() + self.lease_seconds)).rowcount
            if not n:
                raise LeaseLost(f"jobs/{lease.job_id}: the lease is lost")
            return bool(c.execute(select(t.jobs.c.cancel_requested).where(t.jobs.c.job_id == lease.job_id))
                        .scalar_one())

    # -- parallel trials ---------------------------------------------------------------------------
    def open_search(self, lease: Lease, slots: int) -> None:
        """Let up to `slots` other workers join this job's study (claim_helper)."""
        self._write(lease, helper_slots=slots)

    def close_search(self, lease: Lease) -> None:
        self._write(lease, helper_slots=0)

    def claim_helper(self, owner: str, job_id: str = "") -> HelperLease | None:
        """A free slot of a running job whose search is open (of `job_id` only, when given: a Ray
        task submitted for that job), leased to `owner` (a dead helper's slot is free once its lease
        runs out)."""
        now = time.time()
        j, h = t.jobs.c, t.helpers.c
        with self.db.session() as c:
            q = (select(t.jobs).where(j.state == int(JobState.RUNNING), j.helper_slots > 0, j.lease_expires >= now,
                                      j.cancel_requested.is_(False)).order_by(j.create_time))
            if job_id:
                q = q.where(j.job_id == job_id)
            if self.db.dialect == "postgresql":
                q = q.with_for_update(of=t.jobs)  # helpers of one job take its slots one at a time
            for row in c.execute(q).all():
                taken = {r.slot: r for r in c.execute(select(t.helpers).where(h.job_id == row.job_id))}
                if any(r.owner == owner and r.lease_expires >= now for r in taken.values()):
                    continue
                free = [s for s in range(1, row.helper_slots + 1)
                        if s not in taken or taken[s].lease_expires < now]
                if not free:
                    continue
                slot = free[0]
                c.execute(delete(t.helpers).where(h.job_id == row.job_id, h.slot == slot))
                c.execute(insert(t.helpers).values(job_id=row.job_id, slot=slot, owner=owner,
                                                   lease_expires=now + self.lease_seconds))
                return HelperLease(_job(row), owner, slot, row.mlflow_run_id)
        return None

    def _helper_heartbeat(self, helper: HelperLease) -> bool:
        h, j = t.helpers.c, t.jobs.c
        with self.db.session() as c:
            n = c.execute(update(t.helpers).where(h.job_id == helper.job_id, h.slot == helper.slot,
                                                  h.owner == helper.owner).values(
                lease_expires=time.time() + self.lease_seconds)).rowcount
            if not n:
                raise LeaseLost(f"jobs/{helper.job_id}: helper slot {helper.slot} is lost")
            row = c.execute(select(j.state, j.helper_slots, j.cancel_requested).where(j.job_id == helper.job_id)).first()
            return row is None or row.cancel_requested or row.state != int(JobState.RUNNING) or row.helper_slots == 0

    def release_helper(self, helper: HelperLease) -> None:
        h = t.helpers.c
        with self.db.session() as c:
            c.execute(delete(t.helpers).where(h.job_id == helper.job_id, h.slot == helper.slot,
                                              h.owner == helper.owner))

    def live_helpers(self, job_id: str) -> int:
        h = t.helpers.c
        with self.db.read() as c:
            return len(c.execute(select(h.slot).where(h.job_id == job_id, h.lease_expires >= time.time())).all())

    def mlflow_run(self, job_id: str) -> str:
        """The job's MLflow run ("" until its driver has started it)."""
        with self.db.read() as c:
            return c.execute(select(t.jobs.c.mlflow_run_id).where(t.jobs.c.job_id == job_id)).scalar_one()

    def set_run(self, lease: Lease, mlflow_run_id: str) -> None:
        self._write(lease, mlflow_run_id=mlflow_run_id)
        lease.mlflow_run_id = mlflow_run_id

    def report(self, lease: Lease, progress: Progress) -> None:
        self._write(lease, progress=asdict(progress))

    def finish(self, lease: Lease, state: JobState, progress: Progress, result: Result | None = None,
               error: str = "") -> None:
        self._write(lease, state=int(state), progress=asdict(progress), error=error[:4000],
                    result=asdict(result) if result is not None else None, end_time=utc_now(), lease_owner="",
                    helper_slots=0)

    def _write(self, lease: Lease, **values: object) -> None:
        with self.db.session() as c:
            if not c.execute(update(t.jobs).where(self._held(lease)).values(update_time=utc_now(), **values)).rowcount:
                raise LeaseLost(f"jobs/{lease.job_id}: the lease is lost")
