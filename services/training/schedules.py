"""Schedules: a stored job spec submitted on a cron schedule (UTC), or only when triggered (the
retraining template a monitoring alert fires).

A tick (every few seconds in every replica of the service) submits the jobs of the schedules that
are due and moves each one's next run time, in one transaction: on PostgreSQL the due rows are
locked with SELECT ... FOR UPDATE SKIP LOCKED, so two replicas never take the same schedule; on
SQLite the transaction holds the write lock from BEGIN. The job's request id is the schedule and
its due time, so even a tick repeated after a crash between submit and commit submits nothing
twice. A schedule that missed runs (the service was down) runs once, then keeps to its cron from
now: missed runs are not caught up. A trigger submits the spec now, idempotent by its request id.
"""

from __future__ import annotations

import dataclasses
import secrets
from datetime import datetime

from croniter import croniter
from sqlalchemy import and_, delete, select, update

from services.common.db import Database
from services.common.errors import InvalidArgument, NotFound, quote
from services.common.fingerprint import fingerprint
from services.common.idempotency import RequestIds, check_request_id
from services.common.paging import PageRequest
from services.common.timeutil import as_utc, utc_now
from services.training import spec as specs
from services.training import tables as t
from services.training.jobs import JobStore
from services.training.types import Job, JobSpec, Schedule

CREATE = "CreateSchedule"
MAX_DESCRIPTION = 4096


def check_cron(cron: str, field: str = "schedule.cron") -> str:
    cron = cron.strip()
    if cron and (len(cron) > 256 or len(cron.split()) != 5 or not croniter.is_valid(cron)):
        raise InvalidArgument(field, f"{quote(cron)} is not a five-field cron expression (minute hour day "
                              "month weekday, UTC; e.g. '0 3 * * 1')")
    return cron


def next_run(cron: str, after: datetime) -> datetime | None:
    return croniter(cron, after).get_next(datetime) if cron else None


def _schedule(row) -> Schedule:
    return Schedule(schedule_id=row.schedule_id, description=row.description, cron=row.cron,
                    spec=JobSpec.from_dict(row.spec), paused=row.paused, next_run_time=as_utc(row.next_run_time),
                    last_run_time=as_utc(row.last_run_time), last_job_id=row.last_job_id, created_by=row.created_by,
                    create_time=as_utc(row.create_time))


class ScheduleStore:
    def __init__(self, db: Database, jobs: JobStore) -> None:
        self.db = db
        self.jobs = jobs
        self.request_ids = RequestIds(t.idempotency_keys)

    def create(self, description: str, cron: str, spec: JobSpec, principal: str, request_id: str = "") -> Schedule:
        check_request_id(request_id)
        if len(description) > MAX_DESCRIPTION:
            raise InvalidArgument("schedule.description", f"at most {MAX_DESCRIPTION} characters")
        cron = check_cron(cron)
        spec = specs.check(spec)
        payload = {"description": description, "cron": cron, "spec": spec.to_dict()}
        now = utc_now()
        with self.db.session() as c:
            first = self.request_ids.lookup(c, principal, CREATE, request_id, payload)
            if first is not None:
                return self._get(c, first.removeprefix("training/schedules/"))
            schedule_id = secrets.token_hex(8)
            c.execute(t.schedules.insert().values(
                schedule_id=schedule_id, description=description, cron=cron, spec=spec.to_dict(), paused=False,
                next_run_time=next_run(cron, now), last_run_time=None, last_job_id="", created_by=principal,
                create_time=now))
            self.request_ids.remember(c, principal, CREATE, request_id, payload, f"training/schedules/{schedule_id}")
            return self._get(c, schedule_id)

    def _get(self, c, schedule_id: str) -> Schedule:
        row = c.execute(select(t.schedules).where(t.schedules.c.schedule_id == schedule_id)).first()
        if row is None:
            raise NotFound(f"training/schedules/{quote(schedule_id, bare=True)} does not exist")
        return _schedule(row)

    def get(self, schedule_id: str) -> Schedule:
        with self.db.read() as c:
            return self._get(c, schedule_id)

    def list(self, page_size: int, page_token: str) -> tuple[list[Schedule], str]:
        page = PageRequest.parse("ListSchedules", page_size, page_token, key=str)
        q = select(t.schedules).order_by(t.schedules.c.schedule_id).limit(page.limit)
        if page.after is not None:
            q = q.where(t.schedules.c.schedule_id > page.after)
        with self.db.read() as c:
            rows = [_schedule(r) for r in c.execute(q)]
        return page.cut(rows, lambda s: s.schedule_id)

    def pause(self, schedule_id: str, paused: bool) -> Schedule:
        with self.db.session() as c:
            s = self._get(c, schedule_id)
            c.execute(update(t.schedules).where(t.schedules.c.schedule_id == schedule_id).values(
                paused=paused, next_run_time=None if paused else next_run(s.cron, utc_now())))
            return self._get(c, schedule_id)

    def delete(self, schedule_id: str) -> None:
        with self.db.session() as c:
            self._get(c, schedule_id)
            c.execute(delete(t.schedules).where(t.schedules.c.schedule_id == schedule_id))
            self.request_ids.forget(c, CREATE, [f"training/schedules/{schedule_id}"])

    def trigger(self, schedule_id: str, principal: str, reason: str = "", request_id: str = "") -> Job:
        """Submit the schedule's job now, as the caller. The job's own request id is derived from
        the schedule and the caller's id, so a retried trigger returns the first job."""
        check_request_id(request_id)
        if len(reason) > 1024:
            raise InvalidArgument("reason", "at most 1024 characters")
        with self.db.session() as c:
            s = self._get(c, schedule_id)
            job_request = f"trigger-{schedule_id}-{fingerprint(request_id)[:40]}" if request_id else ""
            spec = dataclasses.replace(s.spec, origin=f"trigger:{schedule_id}: {reason}".strip())
            job = self.jobs.submit_in(c, spec, principal, job_request)
            c.execute(update(t.schedules).where(t.schedules.c.schedule_id == schedule_id).values(
                last_run_time=utc_now(), last_job_id=job.job_id))
            return job

    def tick(self, now: datetime | None = None) -> list[str]:
        """Submit the jobs of every due schedule; the ids of the jobs submitted."""
        now = now or utc_now()
        sc = t.schedules.c
        submitted = []
        with self.db.session() as c:
            q = (select(t.schedules).where(and_(sc.paused.is_(False), sc.cron != "", sc.next_run_time <= now))
                 .order_by(sc.next_run_time).limit(100))
            if self.db.dialect == "postgresql":
                q = q.with_for_update(skip_locked=True)
            for row in c.execute(q).all():
                s = _schedule(row)
                due = s.next_run_time
                spec = dataclasses.replace(s.spec, origin=f"schedule:{s.schedule_id}")
                job = self.jobs.submit_in(c, spec, s.created_by, f"schedule-{s.schedule_id}-{int(due.timestamp())}")
                c.execute(update(t.schedules).where(sc.schedule_id == s.schedule_id).values(
                    next_run_time=next_run(s.cron, now), last_run_time=now, last_job_id=job.job_id))
                submitted.append(job.job_id)
        return submitted
