"""The batch_jobs table: job records and their states, job ids, and the checks of a job that need
neither the registry nor the files.

Cancelling is a state change in the database; the runner's progress update after every chunk is
guarded by state == RUNNING, so a cancel through any process stops the job at the next chunk.
Once every row is scored (rows_done == rows_total) a job can no longer be cancelled: it is
publishing, and CANCELLED must mean "no output".
"""

from __future__ import annotations

import enum
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from services.common.artifacts.local import check_key
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.idempotency import RequestIds, check_request_id
from services.common.limits import check_version
from services.common.paging import PageRequest
from services.inference import tables as t


class BatchJobState(enum.IntEnum):
    """A job's state as the batch_jobs table stores it (an integer column). The numbers are the
    ones the table has always held, those of strata.inference.v1.BatchJobState; the conversion to
    the proto enum is in batch_servicer.py."""

    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5


PENDING, RUNNING = BatchJobState.PENDING, BatchJobState.RUNNING
SUCCEEDED, FAILED = BatchJobState.SUCCEEDED, BatchJobState.FAILED
CANCELLED = BatchJobState.CANCELLED
UNFINISHED = (PENDING, RUNNING)
DEFAULT_CHUNK_ROWS = 4096
MAX_CHUNK_ROWS = 1_000_000
INTERRUPTED = "interrupted: the serving process stopped"
_JOB_ID_RE = re.compile(r"^[0-9a-f]{20}\Z")

_request_ids = RequestIds(t.idempotency_keys)
_last_us = 0
_id_lock = threading.Lock()


def new_job_id() -> str:
    """Microseconds (strictly increasing within a process) then randomness, 20 hex digits: ids
    sort by creation time, so newest first is the primary key descending, and a page's position
    is just its last id."""
    global _last_us
    with _id_lock:
        _last_us = max(time.time_ns() // 1000, _last_us + 1)
        return f"{_last_us:014x}{secrets.token_hex(3)}"


@dataclass(frozen=True)
class BatchJobRecord:
    job_id: str
    model: str
    version: int
    alias: str
    input_uri: str
    output_uri: str
    input_columns: tuple[str, ...]
    chunk_rows: int
    state: BatchJobState
    rows_total: int | None  # None until known
    rows_done: int
    error: str
    created_by: str
    worker_id: str
    create_time: datetime
    update_time: datetime


def _record(row) -> BatchJobRecord:  # noqa: ANN001
    return BatchJobRecord(row.job_id, row.model, row.version, row.alias, row.input_uri, row.output_uri,
                          tuple(json.loads(row.input_columns)), row.chunk_rows, BatchJobState(row.state),
                          row.rows_total, row.rows_done, row.error, row.created_by, row.worker_id,
                          row.create_time, row.update_time)


def _check_uri(field: str, uri: str, suffixes: tuple[str, ...]) -> None:
    if not uri:
        raise InvalidArgument(field, "is required")
    if not uri.lower().endswith(suffixes):
        raise InvalidArgument(field, f"'{uri}' must end with {' or '.join(suffixes)}")
    if "://" in uri:
        raise InvalidArgument(field, f"'{uri}': give an absolute local path or an artifact-store key, not a URL")
    if "\x00" in uri:
        raise InvalidArgument(field, "must not contain NUL")
    if not os.path.isabs(uri):
        try:
            check_key(uri)
        except ValueError as e:
            raise InvalidArgument(field, str(e)) from None


def validate_job(*, model: str, version: int = 0, alias: str = "", input_uri: str, output_uri: str,
                 input_columns: Sequence[str] = (), chunk_rows: int = 0) -> None:
    """Everything about a job that can be checked without the registry or the files."""
    if not model:
        raise InvalidArgument("job.model", "model name is required")
    check_version(version, "job.version", optional=True)
    if version and alias:
        raise InvalidArgument("job.alias", "give a version or an alias, not both")
    _check_uri("job.input_uri", input_uri, (".parquet", ".csv"))
    _check_uri("job.output_uri", output_uri, (".parquet",))
    if output_uri == input_uri:
        raise InvalidArgument("job.output_uri", "must differ from input_uri")
    seen: set[str] = set()
    for i, c in enumerate(input_columns):
        if not c:
            raise InvalidArgument(f"job.input_columns[{i}]", "column name is empty")
        if c in seen:
            raise InvalidArgument(f"job.input_columns[{i}]", f"column '{c}' is listed twice")
        seen.add(c)
    if not 0 <= chunk_rows <= MAX_CHUNK_ROWS:
        raise InvalidArgument("job.chunk_rows", f"must be within 0..{MAX_CHUNK_ROWS} (0: {DEFAULT_CHUNK_ROWS})")


def job_spec(*, model: str, version: int = 0, alias: str = "", input_uri: str, output_uri: str,
             input_columns: Sequence[str] = (), chunk_rows: int = 0) -> dict:
    """A job as the request describes it: what a retried CreateBatchJob must repeat."""
    return {"model": model, "version": version, "alias": alias, "input_uri": input_uri, "output_uri": output_uri,
            "input_columns": list(input_columns), "chunk_rows": chunk_rows}


class BatchJobStore:
    """The batch_jobs table. Every state change is one UPDATE guarded by the states it may leave,
    so a cancel, the runner and recover() cannot overwrite each other's outcome."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reads -------------------------------------------------------------------------------
    def get(self, job_id: str) -> BatchJobRecord:
        with self.db.read() as c:
            row = c.execute(select(t.batch_jobs).where(t.batch_jobs.c.job_id == job_id)).one_or_none()
        if row is None:
            raise NotFound(f"batchJobs/{job_id} not found")
        return _record(row)

    def created(self, principal: str, request_id: str, spec: dict) -> BatchJobRecord | None:
        """The job a first CreateBatchJob with this request id made (None: no id, or not seen);
        INVALID_ARGUMENT naming request_id when it carried another job `spec` (the arguments of
        `create` that describe the job, as the request gave them)."""
        check_request_id(request_id)
        with self.db.read() as c:
            prior = _request_ids.lookup(c, principal, "CreateBatchJob", request_id, spec)
        return None if prior is None else self.get(prior)

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[BatchJobRecord], str]:
        """Newest first; returns (jobs, next_page_token) (services/common/paging.py)."""
        page = PageRequest.parse("ListBatchJobs", page_size, page_token, key=str)
        if page.after is not None and not _JOB_ID_RE.match(page.after):
            raise InvalidArgument("page_token", "is not a token returned by this list with these filters")
        q = select(t.batch_jobs).order_by(t.batch_jobs.c.job_id.desc()).limit(page.limit)
        if page.after is not None:
            q = q.where(t.batch_jobs.c.job_id < page.after)
        with self.db.read() as c:
            rows, token = page.cut(c.execute(q).all(), lambda r: r.job_id)
        return [_record(r) for r in rows], token

    # -- changes -----------------------------------------------------------------------------
    def create(self, *, model: str, version: int = 0, alias: str = "", input_uri: str, output_uri: str,
               input_columns: Sequence[str] = (), chunk_rows: int = 0, principal: str, worker_id: str,
               request_id: str = "", resolved_version: int = 0) -> tuple[BatchJobRecord, bool]:
        """A PENDING job owned by worker_id; returns (job, created). A retry by the same principal
        with the same request_id and the same job returns the first job and created=False; the
        same id with another job is INVALID_ARGUMENT naming request_id. resolved_version: the
        version the alias (or "newest") stood for when the job was accepted, so the job scores
        with it (not part of what a retry must repeat)."""
        validate_job(model=model, version=version, alias=alias, input_uri=input_uri, output_uri=output_uri,
                     input_columns=input_columns, chunk_rows=chunk_rows)
        check_request_id(request_id)
        spec = job_spec(model=model, version=version, alias=alias, input_uri=input_uri, output_uri=output_uri,
                        input_columns=input_columns, chunk_rows=chunk_rows)
        job_id, now = new_job_id(), datetime.now(UTC)
        try:
            with self.db.session() as c:
                if (prior := _request_ids.lookup(c, principal, "CreateBatchJob", request_id, spec)) is not None:
                    job_id = prior
                else:
                    c.execute(insert(t.batch_jobs).values(
                        job_id=job_id, model=model, version=resolved_version or version, alias=alias,
                        input_uri=input_uri, output_uri=output_uri, input_columns=json.dumps(list(input_columns)),
                        chunk_rows=chunk_rows or DEFAULT_CHUNK_ROWS, state=PENDING, rows_total=None, rows_done=0,
                        error="", created_by=principal, worker_id=worker_id, create_time=now, update_time=now))
                    _request_ids.remember(c, principal, "CreateBatchJob", request_id, spec, job_id)
        except IntegrityError:
            # A concurrent retry with the same request id got there first.
            if (first := self.created(principal, request_id, spec)) is not None:
                return first, False
            raise
        return self.get(job_id), prior is None

    def _update(self, job_id: str, states: Iterable[BatchJobState], **values: object) -> bool:
        with self.db.session() as c:
            return c.execute(update(t.batch_jobs).where(t.batch_jobs.c.job_id == job_id,
                                                        t.batch_jobs.c.state.in_(list(states)))
                             .values(update_time=datetime.now(UTC), **values)).rowcount == 1

    def start(self, job_id: str, worker_id: str) -> bool:
        """PENDING -> RUNNING; False when the job was cancelled (or failed) before it started."""
        return self._update(job_id, (PENDING,), state=RUNNING, worker_id=worker_id)

    def progress(self, job_id: str, rows_done: int, *, rows_total: int | None = None, version: int = 0) -> bool:
        """Record progress of a RUNNING job. False when it is no longer running (cancelled, or
        failed by recover()): the runner must stop and write nothing."""
        values: dict[str, object] = {"rows_done": rows_done}
        if rows_total is not None:
            values["rows_total"] = rows_total
        if version:
            values["version"] = version
        return self._update(job_id, (RUNNING,), **values)

    def finish(self, job_id: str, state: BatchJobState, error: str = "") -> bool:
        """PENDING/RUNNING -> a final state, unless a cancel (or recover) finished it first."""
        return self._update(job_id, UNFINISHED, state=state, error=error)

    def cancel(self, job_id: str) -> BatchJobRecord:
        with self.db.session() as c:
            # FOR UPDATE (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers): the
            # runner's guarded progress update sees either the cancel or a refusal, never both.
            row = c.execute(select(t.batch_jobs).where(t.batch_jobs.c.job_id == job_id)
                            .with_for_update()).one_or_none()
            if row is None:
                raise NotFound(f"batchJobs/{job_id} not found")
            if row.state == CANCELLED:
                return _record(row)  # a retried cancel
            if row.state not in UNFINISHED:
                word = "succeeded" if row.state == SUCCEEDED else "failed"
                raise FailedPrecondition(f"batchJobs/{job_id} has already {word}; only a pending or running job "
                                         "can be cancelled")
            if row.rows_total is not None and row.rows_done >= row.rows_total:
                raise FailedPrecondition(f"batchJobs/{job_id} has scored every row and is writing its output; "
                                         "it can no longer be cancelled")
            c.execute(update(t.batch_jobs).where(t.batch_jobs.c.job_id == job_id)
                      .values(state=CANCELLED, update_time=datetime.now(UTC)))
        return self.get(job_id)

    def recover(self, worker_alive: Callable[[str], bool]) -> list[BatchJobRecord]:
        """Mark PENDING/RUNNING jobs whose serving process is gone FAILED ("interrupted"), and
        return them. Call it at start-up, before this process runs jobs (its own worker id, when
        reused from a previous life, must count as gone), and from time to time with the ids of
        the processes whose heartbeats are current."""
        with self.db.session() as c:
            rows = c.execute(select(t.batch_jobs.c.job_id, t.batch_jobs.c.worker_id)
                             .where(t.batch_jobs.c.state.in_(UNFINISHED))).all()
            gone = [r.job_id for r in rows if not worker_alive(r.worker_id)]
            if gone:
                c.execute(update(t.batch_jobs).where(t.batch_jobs.c.job_id.in_(gone),
                                                     t.batch_jobs.c.state.in_(UNFINISHED))
                          .values(state=FAILED, error=INTERRUPTED, update_time=datetime.now(UTC)))
        return [self.get(j) for j in gone]
