"""The job store on both databases: idempotent submits, paging, cancel, and the lease that keeps
a job with one worker at a time and hands it on when that worker stops renewing."""

from __future__ import annotations

import time

import pytest

from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.training.app import MIGRATIONS
from services.training.jobs import JobStore, LeaseLost
from services.training.types import DatasetSpec, JobSpec, JobState, Progress, Result, Task


def _spec(name: str = "m") -> JobSpec:
    return JobSpec(dataset=DatasetSpec(label_column="y", table_uri="t.parquet"), task=Task.REGRESSION,
                   model_name=name, family="linear")


@pytest.fixture
def store(database_url: str) -> JobStore:
    db = Database(database_url)
    db.migrate(MIGRATIONS)
    yield JobStore(db, lease_seconds=1.0)
    db.dispose()


def test_submit_is_idempotent_by_request_id(store: JobStore) -> None:
    a = store.submit(_spec(), "alice", "r1")
    assert store.submit(_spec(), "alice", "r1").job_id == a.job_id
    assert store.submit(_spec(), "bob", "r1").job_id != a.job_id  # ids are per principal
    with pytest.raises(InvalidArgument) as e:
        store.submit(_spec("other"), "alice", "r1")
    assert e.value.field == "request_id"
    got = store.get(a.job_id)
    assert got.state == JobState.QUEUED and got.spec == _spec() and got.created_by == "alice"


def test_list_pages_newest_first_and_filters_by_state(store: JobStore) -> None:
    ids = [store.submit(_spec(), "alice").job_id for _ in range(5)]
    first, token = store.list(None, 3, "")
    second, last = store.list(None, 3, token)
    assert [j.job_id for j in first + second] == ids[::-1] and last == ""
    store.cancel(ids[0])
    assert [j.job_id for j in store.list(JobState.CANCELLED, 0, "")[0]] == [ids[0]]
    with pytest.raises(InvalidArgument) as e:
        store.list(JobState.QUEUED, 3, token)  # a token of another query
    assert e.value.field == "page_token"


def test_one_worker_holds_a_job_until_its_lease_runs_out(store: JobStore) -> None:
    job = store.submit(_spec(), "alice")
    lease = store.claim("w1")
    assert lease is not None and lease.job_id == job.job_id and lease.job.attempts == 1
    assert store.claim("w2") is None  # held
    store.report(lease, Progress(stage="searching", trials_done=3))
    assert store.get(job.job_id).progress.trials_done == 3
    time.sleep(1.2)  # w1 stops renewing: the job goes to the next worker, as a resumed attempt
    taken = store.claim("w2")
    assert taken is not None and taken.job_id == job.job_id and taken.job.attempts == 2
    with pytest.raises(LeaseLost):
        store.heartbeat(lease)
    with pytest.raises(LeaseLost):  # the old holder can no longer write anything
        store.finish(lease, JobState.FAILED, Progress(), error="late")
    store.finish(taken, JobState.SUCCEEDED, Progress(stage="done"), Result(family="linear"))
    done = store.get(job.job_id)
    assert done.state == JobState.SUCCEEDED and done.result.family == "linear" and done.error == ""


def test_cancel_queued_now_running_at_the_next_heartbeat_finished_refused(store: JobStore) -> None:
    queued = store.submit(_spec(), "alice")
    assert store.cancel(queued.job_id).state == JobState.CANCELLED
    running = store.submit(_spec(), "alice")
    lease = store.claim("w1")
    assert lease.job_id == running.job_id
    assert store.heartbeat(lease) is False
    assert store.cancel(running.job_id).state == JobState.RUNNING
    assert store.heartbeat(lease) is True
    store.finish(lease, JobState.CANCELLED, Progress(stage="cancelled"))
    with pytest.raises(FailedPrecondition):
        store.cancel(running.job_id)
    with pytest.raises(NotFound):
        store.cancel("nope")


def test_a_cancelled_job_whose_worker_died_is_closed_not_rerun(store: JobStore) -> None:
    job = store.submit(_spec(), "alice")
    store.claim("w1")
    store.cancel(job.job_id)
    time.sleep(1.2)
    assert store.claim("w2") is None
    assert store.get(job.job_id).state == JobState.CANCELLED


def test_helpers_take_the_open_slots_of_a_search_and_free_them(store: JobStore) -> None:
    job = store.submit(_spec(), "alice")
    driver = store.claim("w1")
    assert store.claim_helper("w2") is None  # the search is not open yet
    store.open_search(driver, 2)
    a, b = store.claim_helper("w2"), store.claim_helper("w3")
    assert (a.job_id, a.slot, b.slot) == (job.job_id, 1, 2) and store.live_helpers(job.job_id) == 2
    assert store.claim_helper("w4") is None  # both slots taken
    assert store.heartbeat(a) is False
    store.release_helper(a)
    c = store.claim_helper("w4")
    assert c.slot == 1
    store.close_search(driver)
    assert store.heartbeat(c) is True  # closed: the helper stops
    time.sleep(1.2)  # b stopped renewing: its slot is free again, but the search is closed
    assert store.live_helpers(job.job_id) <= 1 and store.claim_helper("w5") is None
    with pytest.raises(LeaseLost):
        store.release_helper(b) or store.heartbeat(b)


def test_a_helper_sent_for_one_job_takes_only_its_slots(store: JobStore) -> None:
    first, second = store.submit(_spec(), "alice"), store.submit(_spec(), "alice")
    a, b = store.claim("w1"), store.claim("w2")
    store.open_search(a, 1)
    store.open_search(b, 1)
    assert store.claim_helper("ray-1", job_id=second.job_id).job_id == second.job_id
    assert store.claim_helper("ray-2", job_id=second.job_id) is None  # the first job's free slot is not for it
    assert store.claim_helper("w3").job_id == first.job_id
    assert store.mlflow_run(first.job_id) == ""  # until its driver starts the run
    store.set_run(a, "run-1")
    assert store.mlflow_run(first.job_id) == "run-1"
