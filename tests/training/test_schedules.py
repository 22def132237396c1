"""Schedules on both databases: cron checked, a due schedule submitted once per due time however
many replicas tick, pause and resume, and the trigger idempotent by its request id."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from services.common.db import Database
from services.common.errors import InvalidArgument
from services.common.timeutil import utc_now
from services.training.app import MIGRATIONS
from services.training.jobs import JobStore
from services.training.schedules import ScheduleStore
from services.training.types import DatasetSpec, JobSpec, Task


def _spec() -> JobSpec:
    return JobSpec(dataset=DatasetSpec(label_column="y", table_uri="t.parquet"), task=Task.REGRESSION,
                   model_name="m", family="linear")


@pytest.fixture
def stores(database_url: str) -> tuple[ScheduleStore, JobStore]:
    db = Database(database_url)
    db.migrate(MIGRATIONS)
    jobs = JobStore(db)
    yield ScheduleStore(db, jobs), jobs
    db.dispose()


@pytest.mark.parametrize("cron", ["not cron", "* * *", "61 * * * *", "* * * * * *", "@reboot"])
def test_a_bad_cron_is_refused_naming_the_field(stores, cron: str) -> None:
    schedules, _ = stores
    with pytest.raises(InvalidArgument) as e:
        schedules.create("", cron, _spec(), "alice")
    assert e.value.field == "schedule.cron"
    assert schedules.list(0, "")[0] == []


def test_a_due_schedule_runs_once_per_due_time_however_many_replicas_tick(stores, database_url: str) -> None:
    schedules, jobs = stores
    s = schedules.create("nightly", "*/5 * * * *", _spec(), "alice")
    assert s.next_run_time > utc_now() and s.next_run_time.minute % 5 == 0
    assert schedules.tick() == []  # not due yet
    due = s.next_run_time + timedelta(seconds=1)
    # Three replicas tick at the due time at once, each with its own engine.
    replicas = [ScheduleStore(db, JobStore(db)) for db in (Database(database_url) for _ in range(3))]
    out: list[list[str]] = []
    threads = [threading.Thread(target=lambda r=r: out.append(r.tick(due))) for r in replicas]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    submitted = [j for part in out for j in part]
    assert len(submitted) == 1, out
    after = schedules.get(s.schedule_id)
    assert after.last_job_id == submitted[0] and after.next_run_time > due
    job = jobs.get(submitted[0])
    assert job.created_by == "alice" and job.spec.origin == f"schedule:{s.schedule_id}"
    assert schedules.tick(due) == []  # moved on: the same due time never runs twice
    for r in replicas:
        r.db.dispose()


def test_pause_resume_delete(stores) -> None:
    schedules, _ = stores
    s = schedules.create("", "0 3 * * *", _spec(), "alice", request_id="sched-1")
    assert schedules.create("", "0 3 * * *", _spec(), "alice", request_id="sched-1").schedule_id == s.schedule_id
    paused = schedules.pause(s.schedule_id, True)
    assert paused.paused and paused.next_run_time is None
    assert schedules.tick(utc_now() + timedelta(days=2)) == []
    resumed = schedules.pause(s.schedule_id, False)
    assert not resumed.paused and resumed.next_run_time.hour == 3
    schedules.delete(s.schedule_id)
    assert schedules.list(0, "")[0] == []


def test_trigger_submits_now_and_is_idempotent_by_request_id(stores) -> None:
    schedules, jobs = stores
    template = schedules.create("retrain on drift", "", _spec(), "alice")  # no cron: only by trigger
    assert template.next_run_time is None and schedules.tick(utc_now() + timedelta(days=365)) == []
    a = schedules.trigger(template.schedule_id, "monitoring", "drift on amount", request_id="alert-7")
    b = schedules.trigger(template.schedule_id, "monitoring", "drift on amount", request_id="alert-7")
    c = schedules.trigger(template.schedule_id, "monitoring", "drift on amount", request_id="alert-8")
    assert a.job_id == b.job_id != c.job_id
    assert jobs.get(a.job_id).spec.origin == f"trigger:{template.schedule_id}: drift on amount"
    assert jobs.get(a.job_id).created_by == "monitoring"
