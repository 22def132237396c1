"""Batch scoring jobs: a Parquet or CSV file scored by a model version into a Parquet file.

The job row in the service database is what every serving process shares: state, progress and
cancellation. The process that accepted a job runs it (BatchRunner), chunk_rows rows at a time:
read (pyarrow, streaming) -> numpy feeds (column by column, vectorised) -> the model (in a
worker thread) -> appended to a Parquet file at a temporary location. Only when every row is
scored is the file published to output_uri, in one atomic step, so a failed or cancelled job
leaves nothing there.

Output layout: the input's columns unchanged, then one column per model output, named like the
output. An output with one value per row ([N] or [N, 1]) is a plain column; a wider one is a
fixed_size_list column holding the row's values (row-major, flattened when the rank is > 2).

Cancelling is a state change in the database; the runner's progress update after every chunk is
guarded by state == RUNNING, so a cancel through any process stops the job at the next chunk.
Once every row is scored (rows_done == rows_total) a job can no longer be cancelled: it is
publishing, and CANCELLED must mean "no output".
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from google.protobuf import timestamp_pb2
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from strata.inference.v1 import inference_pb2 as pb

from services.common.artifacts import ArtifactNotFound, ArtifactStore, LocalArtifactStore
from services.common.artifacts.local import check_key
from services.common.audit import current_resource
from services.common.auth import current_principal
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, StrataError
from services.common.limits import check_version
from services.common.paths import Confinement
from services.inference import tables as t
from services.inference.models import LoadedModel, ModelRef
from services.inference.runtime import NUMPY_TO_V2, ModelRuntime, TensorInfo

log = logging.getLogger("strata.inference.batch")

PENDING, RUNNING = pb.BATCH_JOB_STATE_PENDING, pb.BATCH_JOB_STATE_RUNNING
SUCCEEDED, FAILED = pb.BATCH_JOB_STATE_SUCCEEDED, pb.BATCH_JOB_STATE_FAILED
CANCELLED = pb.BATCH_JOB_STATE_CANCELLED
UNFINISHED = (PENDING, RUNNING)
DEFAULT_CHUNK_ROWS = 4096
MAX_CHUNK_ROWS = 1_000_000
MAX_PAGE_SIZE = 500
INTERRUPTED = "interrupted: the serving process stopped"
PART_BYTES = 16 << 20  # staged-upload part size for outputs going to the artifact store
_JOB_ID_RE = re.compile(r"^[0-9a-f]{20}\Z")

_last_us = 0
_id_lock = threading.Lock()


def new_job_id() -> str:
    """Microseconds (strictly increasing within a process) then randomness, 20 hex digits: ids
    sort by creation time, so newest first is the primary key descending, and a page token is
    just the last id."""
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
    state: int
    rows_total: int | None  # None until known
    rows_done: int
    error: str
    created_by: str
    worker_id: str
    create_time: datetime
    update_time: datetime


def _record(row) -> BatchJobRecord:  # noqa: ANN001
    return BatchJobRecord(row.job_id, row.model, row.version, row.alias, row.input_uri, row.output_uri,
                          tuple(json.loads(row.input_columns)), row.chunk_rows, row.state, row.rows_total,
                          row.rows_done, row.error, row.created_by, row.worker_id, row.create_time,
                          row.update_time)


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

    def by_request_id(self, request_id: str) -> BatchJobRecord | None:
        with self.db.read() as c:
            row = c.execute(select(t.batch_jobs)
                            .where(t.batch_jobs.c.create_request_id == request_id)).one_or_none()
        return None if row is None else _record(row)

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[BatchJobRecord], str]:
        """Newest first; returns (jobs, next_page_token)."""
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be within 0..{MAX_PAGE_SIZE}")
        if page_token and not _JOB_ID_RE.match(page_token):
            raise InvalidArgument("page_token", "is not a token returned by ListBatchJobs")
        size = page_size or 50
        q = select(t.batch_jobs).order_by(t.batch_jobs.c.job_id.desc()).limit(size + 1)
        if page_token:
            q = q.where(t.batch_jobs.c.job_id < page_token)
        with self.db.read() as c:
            rows = c.execute(q).all()
        jobs = [_record(r) for r in rows[:size]]
        return jobs, jobs[-1].job_id if len(rows) > size else ""

    # -- changes -----------------------------------------------------------------------------
    def create(self, *, model: str, version: int = 0, alias: str = "", input_uri: str, output_uri: str,
               input_columns: Sequence[str] = (), chunk_rows: int = 0, principal: str, worker_id: str,
               request_id: str = "", resolved_version: int = 0) -> tuple[BatchJobRecord, bool]:
        """A PENDING job owned by worker_id; returns (job, created). A retry with the same
        request_id returns the first job and created=False. resolved_version: the version the
        alias (or "newest") stood for when the job was accepted, so the job scores with it."""
        validate_job(model=model, version=version, alias=alias, input_uri=input_uri, output_uri=output_uri,
                     input_columns=input_columns, chunk_rows=chunk_rows)
        if request_id and (prior := self.by_request_id(request_id)) is not None:
            return prior, False
        job_id, now = new_job_id(), datetime.now(UTC)
        try:
            with self.db.session() as c:
                c.execute(insert(t.batch_jobs).values(
                    job_id=job_id, model=model, version=resolved_version or version, alias=alias,
                    input_uri=input_uri, output_uri=output_uri, input_columns=json.dumps(list(input_columns)),
                    chunk_rows=chunk_rows or DEFAULT_CHUNK_ROWS, state=PENDING, rows_total=None, rows_done=0,
                    error="", created_by=principal, create_request_id=request_id or None, worker_id=worker_id,
                    create_time=now, update_time=now))
        except IntegrityError:
            # A concurrent retry with the same request id got there first.
            if request_id and (prior := self.by_request_id(request_id)) is not None:
                return prior, False
            raise
        return self.get(job_id), True

    def _update(self, job_id: str, states: Iterable[int], **values: object) -> bool:
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

    def finish(self, job_id: str, state: int, error: str = "") -> bool:
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


# -- reading the input and building the model's feeds ------------------------------------------
class JobError(Exception):
    """A problem with the job's input, model or output; the job fails with this message."""


class _Interrupted(Exception):
    pass


class Models(Protocol):
    """What the runner needs of ModelStore."""

    async def resolve(self, model: str, version: int = 0, alias: str = "") -> ModelRef: ...

    async def load(self, ref: ModelRef) -> LoadedModel: ...


@dataclass(frozen=True)
class _Feed:
    """How one model input is built from the file's columns."""

    spec: TensorInfo
    columns: tuple[str, ...]
    matrix: bool  # True: the columns side by side are the [N, F] input; False: one column is the input


def _v2(dtype: np.dtype) -> str:
    return NUMPY_TO_V2.get(dtype, str(dtype))


def _numeric(typ: pa.DataType) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)


def _is_list(typ: pa.DataType) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _arrow_type(dtype: np.dtype) -> pa.DataType:
    return pa.string() if dtype == np.dtype(object) else pa.from_numpy_dtype(dtype)


def _check_type(typ: pa.DataType, column: str, spec: TensorInfo, text: bool) -> None:
    is_str = pa.types.is_string(typ) or pa.types.is_large_string(typ)
    # CSV (text): a column named for a numeric input is parsed as the model's type when read, and
    # a value that does not parse fails the job then, naming it.
    ok = is_str if spec.dtype == np.dtype(object) else _numeric(typ) or (text and is_str)
    if not ok:
        raise JobError(f"column '{column}' is {typ}; the model's input '{spec.name}' takes {_v2(spec.dtype)}")


def plan_feeds(schema: pa.Schema, inputs: list[TensorInfo], input_columns: Sequence[str],
               text: bool = False) -> list[_Feed]:
    """Map the file's columns to the model's inputs (the rules of BatchJob.input_columns), and
    check names, types and widths once, before any row is read. text: the file is CSV."""
    names = schema.names
    sig = ", ".join(f"'{i.name}' {_v2(i.dtype)}{list(i.shape)}" for i in inputs)
    one_matrix = len(inputs) == 1 and len(inputs[0].shape) == 2
    numeric_columns = tuple(f.name for f in schema if _numeric(f.type))
    if input_columns:
        if not one_matrix:
            raise JobError(f"input_columns needs a model with one 2-D input; the model takes {sig}")
        plan = [_Feed(inputs[0], tuple(input_columns), True)]
    elif all(i.name in names for i in inputs):
        plan = [_Feed(i, (i.name,), False) for i in inputs]
    elif one_matrix:
        if not numeric_columns:
            raise JobError(f"the input file has no numeric column to form the model's input {sig}; "
                           f"its columns are {names}")
        plan = [_Feed(inputs[0], numeric_columns, True)]
    else:
        raise JobError(f"the input file has no column for each of the model's inputs {sig}; "
                       f"its columns are {names}")
    for f in plan:
        missing = [c for c in f.columns if schema.get_field_index(c) < 0]  # -1: absent (or duplicated)
        if missing:
            raise JobError(f"the input file has no column {', '.join(map(repr, missing))}; its columns are {names}")
        spec = f.spec
        if f.matrix:
            if spec.shape[1] not in (-1, len(f.columns)):
                raise JobError(f"the model's input '{spec.name}' takes {spec.shape[1]} features per row; "
                               f"{len(f.columns)} columns were given ({', '.join(f.columns)}); name the feature "
                               "columns with input_columns")
            for c in f.columns:
                _check_type(schema.field(c).type, c, spec, text)
            continue
        c, typ = f.columns[0], schema.field(f.columns[0]).type
        if len(spec.shape) > 2:
            raise JobError(f"the model's input '{spec.name}' has shape {list(spec.shape)}; batch jobs feed inputs "
                           "of shape [N] or [N, F]")
        if _is_list(typ):
            if len(spec.shape) != 2:
                raise JobError(f"column '{c}' holds lists; the model's input '{spec.name}' takes one value per row")
            if pa.types.is_fixed_size_list(typ) and spec.shape[1] not in (-1, typ.list_size):
                raise JobError(f"column '{c}' holds lists of {typ.list_size}; the model's input '{spec.name}' "
                               f"takes {spec.shape[1]} values per row")
            _check_type(typ.value_type, c, spec, False)
        else:
            _check_type(typ, c, spec, text)
            if len(spec.shape) == 2 and spec.shape[1] not in (-1, 1):
                raise JobError(f"column '{c}' holds one value per row; the model's input '{spec.name}' takes "
                               f"{spec.shape[1]} (give a list column, or name the columns with input_columns)")
    return plan


def _values(col: pa.ChunkedArray | pa.Array, column: str, dtype: np.dtype) -> np.ndarray:
    """One column as a 1-D numpy array of the model's dtype (Arrow's cast: vectorised, and safe:
    3.5 -> int or 300 -> int8 is an error, not a silent change)."""
    if col.null_count:
        raise JobError(f"column '{column}' has {col.null_count} empty value(s); the model needs every value")
    target = _arrow_type(dtype)
    # Integer features becoming floats may round (int64 -> float32): that is the usual conversion.
    safe = not (pa.types.is_integer(col.type) and pa.types.is_floating(target))
    try:
        return pc.cast(col, target, safe=safe).to_numpy()
    except pa.ArrowInvalid as e:
        raise JobError(f"column '{column}': {e}") from None


def build_feeds(tbl: pa.Table, plan: list[_Feed]) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for f in plan:
        spec, n = f.spec, tbl.num_rows
        if f.matrix:
            m = np.empty((n, len(f.columns)), dtype=spec.dtype)
            for j, c in enumerate(f.columns):
                m[:, j] = _values(tbl.column(c), c, spec.dtype)
            feeds[spec.name] = m
            continue
        c = f.columns[0]
        col = tbl.column(c)
        if _is_list(col.type):
            if col.null_count:
                raise JobError(f"column '{c}' has {col.null_count} empty value(s); the model needs every value")
            mm = pc.min_max(pc.list_value_length(col))
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if lo != hi:
                raise JobError(f"column '{c}' holds lists of {lo} to {hi} values; the model's input "
                               f"'{spec.name}' needs the same number in every row")
            feeds[spec.name] = _values(pc.list_flatten(col), c, spec.dtype).reshape(n, lo)
        else:
            v = _values(col, c, spec.dtype)
            feeds[spec.name] = v.reshape(n, 1) if len(spec.shape) == 2 else v
    return feeds


def _rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly `rows` rows (the last may be shorter): readers cut at their own bounds
    (CSV blocks, Parquet row groups)."""
    pending: list[pa.RecordBatch] = []
    have = 0
    for b in batches:
        while b.num_rows:
            take = min(rows - have, b.num_rows)
            pending.append(b.slice(0, take))
            have, b = have + take, b.slice(take)
            if have == rows:
                yield pa.Table.from_batches(pending)
                pending, have = [], 0
    if have:
        yield pa.Table.from_batches(pending)


def _is_csv(path: Path | str) -> bool:
    return str(path).lower().endswith(".csv")


def read_schema(path: Path) -> tuple[pa.Schema, int | None]:
    """The file's schema and row count (None for CSV: known only once read)."""
    if _is_csv(path):
        with pacsv.open_csv(path) as r:  # infers the types from the first block
            return r.schema, None
    with pq.ParquetFile(path) as pf:
        return pf.schema_arrow, pf.metadata.num_rows


def read_chunks(path: Path, rows: int, plan: list[_Feed], names: list[str]) -> Iterator[pa.Table]:
    """The file in tables of `rows` rows. names: the file's columns (for error messages)."""
    if _is_csv(path):
        # The model's columns are parsed as the model's types from the start: inference from the
        # first block alone would make "1" an int64 and then fail on a later "1.5".
        types = {c: _arrow_type(f.spec.dtype) for f in plan for c in f.columns}
        try:
            with pacsv.open_csv(path, convert_options=pacsv.ConvertOptions(column_types=types)) as r:
                yield from _rechunk(r, rows)
        except pa.ArrowInvalid as e:  # Arrow names the column by its index only
            raise JobError(re.sub(r"CSV column #(\d+)", lambda m: f"CSV column '{names[int(m[1])]}'"
                                  if int(m[1]) < len(names) else m[0], str(e))) from None
    else:
        with pq.ParquetFile(path) as pf:
            yield from _rechunk(pf.iter_batches(batch_size=rows), rows)


def _piece_rows(rt: ModelRuntime) -> int:
    """Rows per model run: the max batch size; for a model without a dynamic batch dimension its
    fixed one (often 1); 0: the whole chunk at once."""
    if rt.max_batch_size:
        return rt.max_batch_size
    dims = {i.shape[0] for i in rt.inputs if i.shape}
    return dims.pop() if len(dims) == 1 and next(iter(dims)) > 0 else 0


def score(rt: ModelRuntime, feeds: dict[str, np.ndarray], rows: int, first_row: int) -> list[np.ndarray]:
    """Run the model over one chunk, in pieces the model accepts; one output row per input row."""
    step = _piece_rows(rt) or rows
    pieces: list[list[np.ndarray]] = []
    for i in range(0, rows, step):
        part = {k: v[i:i + step] for k, v in feeds.items()}
        where = f"rows {first_row + i}..{first_row + min(i + step, rows) - 1}"
        try:
            rt.check(part)
        except InvalidArgument as e:
            raise JobError(f"{where}: {e.message}") from None
        try:
            outs = [np.asarray(o) for o in rt.run(part)]
        except Exception as e:  # ONNX Runtime's errors describe the model's failure
            raise JobError(f"{where}: the model failed: {e}") from None
        got = min(len(part[k]) for k in part)
        for name, o in zip(rt.output_names, outs, strict=True):
            if o.ndim == 0 or o.shape[0] != got:
                raise JobError(f"the model's output '{name}' has shape {list(o.shape)} for {got} input rows; "
                               "batch jobs need one output row per input row")
        pieces.append(outs)
    return [np.concatenate(p) if len(p) > 1 else p[0] for p in zip(*pieces, strict=True)]


def _output_array(arr: np.ndarray) -> pa.Array:
    width = math.prod(arr.shape[1:])
    values = pa.array(arr.reshape(-1), type=_arrow_type(arr.dtype))
    return values if width == 1 else pa.FixedSizeListArray.from_arrays(values, width)


def _declared_type(info: TensorInfo) -> pa.DataType:
    """An output's column type from the signature alone (for an input without rows)."""
    base, rest = _arrow_type(info.dtype), info.shape[1:]
    if -1 in rest:
        return pa.list_(base)
    width = math.prod(rest)
    return base if width == 1 else pa.list_(base, width)


# -- the output: a temporary file, published when complete ---------------------------------------
class _Output:
    """A local path: written to `<path>.tmp-<job>` beside it, then os.replace'd (atomic on one
    file system). An artifact key: written to a scratch file, staged in parts, then published."""

    def __init__(self, uri: str, job_id: str, artifacts: ArtifactStore | None, scratch: Path) -> None:
        self.key = None if os.path.isabs(uri) else uri
        self.final = Path(uri) if self.key is None else None
        self.tmp = Path(f"{uri}.tmp-{job_id}") if self.key is None else scratch / f"{job_id}.out.parquet"
        self.upload_id = f"batch-{job_id}"
        self.artifacts = artifacts
        self.writer: pq.ParquetWriter | None = None

    def write(self, tbl: pa.Table) -> None:
        if self.writer is None:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, tbl.schema)
        self.writer.write_table(tbl)

    def close(self) -> None:
        if self.writer is not None and self.writer.is_open:
            self.writer.close()

    def publish(self) -> None:
        self.close()
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are durable before the name points at them
        finally:
            os.close(fd)
        if self.final is not None:
            os.replace(self.tmp, self.final)
            dfd = os.open(self.final.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return
        assert self.artifacts is not None and self.key is not None
        with open(self.tmp, "rb") as f:
            part = 0
            while data := f.read(PART_BYTES):
                self.artifacts.stage_part(self.upload_id, part, data)
                part += 1
        if part == 0:  # publish needs a part; an empty file is not a Parquet file anyway
            self.artifacts.stage_part(self.upload_id, 0, b"")
        self.artifacts.publish(self.upload_id, self.key)
        self.tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass
        self.tmp.unlink(missing_ok=True)
        if self.key is not None and self.artifacts is not None:
            self.artifacts.discard_staged(self.upload_id)


class BatchRunner:
    """Runs this process's batch jobs as asyncio tasks, at most `max_running` at a time (the rest
    stay PENDING): each keeps a worker thread busy, and the RPCs' database calls need threads
    of the same default executor. Blocking work (reading, the model, writing, the database)
    goes to worker threads; the event loop only sequences it."""

    def __init__(self, store: BatchJobStore, models: Models, artifacts: ArtifactStore | None, worker_id: str,
                 scratch_dir: Path | None = None, max_running: int = 2, local_paths: Sequence[str] = ()) -> None:
        """`local_paths`: directories outside the artifact store that jobs may read from and
        write to by absolute path (STRATA_INFERENCE_BATCH_PATHS); nothing else on the host."""
        self.store = store
        self.models = models
        self.artifacts = artifacts
        root = (str(artifacts.root) if isinstance(artifacts, LocalArtifactStore)
                else artifacts.uri("x")[:-1] if artifacts is not None else None)
        self.confinement = Confinement(root, read_roots=local_paths,
                                       write_roots=[*([root] if root else []), *local_paths])
        self.worker_id = worker_id
        self.scratch_dir = scratch_dir or Path(tempfile.gettempdir()) / "strata-batch"
        self._slots = asyncio.Semaphore(max_running)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    async def submit(self, job_id: str) -> None:
        """Start running a PENDING job; returns at once."""
        if job_id in self._tasks or self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._run(job_id), name=f"batch-job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda t: self._done(job_id, t))

    def _done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        if not task.cancelled() and (e := task.exception()) is not None:  # e.g. the database was unreachable
            log.error("batch job runner failed", exc_info=e, extra={"fields": {"job_id": job_id}})

    async def wait(self, job_id: str) -> None:
        """Until this process's run of the job ends (tests, shutdown)."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        """Stop: running jobs end after their current chunk and are marked failed (interrupted).
        The tasks are not cancelled, so no thread is left writing a file being removed."""
        self._stopping = True
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def recover(self, worker_alive: Callable[[str], bool]) -> list[BatchJobRecord]:
        """BatchJobStore.recover, then remove what the interrupted runs left behind (temp files
        beside local outputs, staged uploads, this machine's scratch files)."""
        jobs = await asyncio.to_thread(self.store.recover, worker_alive)
        for j in jobs:
            out = _Output(j.output_uri, j.job_id, self.artifacts, self.scratch_dir)
            await asyncio.to_thread(self._cleanup, out, j.job_id)
        return jobs

    def check_paths(self, input_uri: str, output_uri: str) -> None:
        """INVALID_ARGUMENT unless a job may read `input_uri` and write `output_uri`
        (services/common/paths.py), with the same answer whether or not a file is there."""
        if self.confinement.readable(input_uri, "job.input_uri").is_glob:
            raise InvalidArgument("job.input_uri", "name one file, not a glob")
        self.confinement.writable(output_uri, "job.output_uri")

    def input_exists(self, uri: str) -> bool:
        try:
            self._input_path(uri, None)
        except JobError:
            return False
        return True

    # -- one job -----------------------------------------------------------------------------
    def _input_path(self, uri: str, job_id: str | None) -> Path | None:
        """A local file to read: the path itself, the local artifact store's file, or a scratch
        copy of the object (Parquet needs random access). job_id None: only check it exists."""
        if os.path.isabs(uri):
            if not os.path.isfile(uri):
                raise JobError(f"input_uri: no file at {uri}")
            return Path(uri)
        if self.artifacts is None:
            raise JobError("input_uri: this service has no artifact store; give an absolute path")
        if isinstance(self.artifacts, LocalArtifactStore):
            path = self.artifacts.root / check_key(uri)
            if not path.is_file():
                raise JobError(f"input_uri: '{uri}' is not in the artifact store")
            return path
        if job_id is None:
            if not self.artifacts.exists(uri):
                raise JobError(f"input_uri: '{uri}' is not in the artifact store")
            return None
        path = self.scratch_dir / f"{job_id}.in{Path(uri).suffix.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as f:
                for chunk in self.artifacts.open_read(uri):
                    f.write(chunk)
        except ArtifactNotFound:
            path.unlink(missing_ok=True)
            raise JobError(f"input_uri: '{uri}' is not in the artifact store") from None
        return path

    def _cleanup(self, out: _Output, job_id: str) -> None:
        out.discard()
        for p in self.scratch_dir.glob(f"{job_id}.*"):
            p.unlink(missing_ok=True)

    async def _run(self, job_id: str) -> None:
        async with self._slots:
            if self._stopping:  # queued when the process began to stop
                await asyncio.to_thread(self.store.finish, job_id, FAILED, INTERRUPTED)
                return
            await self._run_one(job_id)

    async def _run_one(self, job_id: str) -> None:
        to_thread = asyncio.to_thread
        job = await to_thread(self.store.get, job_id)
        if not await to_thread(self.store.start, job_id, self.worker_id):
            return  # cancelled before it started
        out = _Output(job.output_uri, job_id, self.artifacts, self.scratch_dir)
        started, published, error = time.perf_counter(), False, ""
        try:
            published = await self._execute(job, out)
        except _Interrupted:
            error = INTERRUPTED
        except JobError as e:
            error = str(e)
        except StrataError as e:  # resolving or loading the model
            error = e.message
        except (OSError, ValueError, pa.ArrowException) as e:  # unreadable files, disk full, bad Parquet
            error = f"{type(e).__name__}: {e}"
        except asyncio.CancelledError:
            # Torn down without close(): record it synchronously (the task must not await again).
            self._cleanup(out, job_id)
            self.store.finish(job_id, FAILED, INTERRUPTED)
            raise
        except Exception as e:
            log.exception("batch job crashed", extra={"fields": {"job_id": job_id}})
            error = f"internal error ({type(e).__name__}); see the inference service's log"
        await to_thread(self._cleanup, out, job_id)  # once published, only scratch files are left
        fields = {"job_id": job_id, "model": job.model, "seconds": round(time.perf_counter() - started, 3)}
        if error:
            log.info("batch job failed", extra={"fields": {**fields, "error": error}})
            await to_thread(self.store.finish, job_id, FAILED, error)
        elif published:
            log.info("batch job succeeded", extra={"fields": fields})
            await to_thread(self.store.finish, job_id, SUCCEEDED)
        else:
            log.info("batch job cancelled", extra={"fields": fields})

    async def _execute(self, job: BatchJobRecord, out: _Output) -> bool:
        """Score the whole input into `out` and publish it. False: cancelled (nothing published)."""
        to_thread = asyncio.to_thread
        self.check_paths(job.input_uri, job.output_uri)  # again: the allowed places may have changed
        ref = await self.models.resolve(job.model, job.version, "" if job.version else job.alias)
        rt = (await self.models.load(ref)).runtime
        if not await to_thread(self.store.progress, job.job_id, 0, version=ref.version):
            return False
        path = await to_thread(self._input_path, job.input_uri, job.job_id)
        assert path is not None
        schema, total = await to_thread(read_schema, path)
        plan = plan_feeds(schema, rt.inputs, job.input_columns, text=_is_csv(path))
        clash = [n for n in rt.output_names if n in schema.names]
        if clash:
            raise JobError(f"the input file has column(s) named like the model's outputs {clash}; rename them")
        if not await to_thread(self.store.progress, job.job_id, 0, rows_total=total):
            return False
        chunks = read_chunks(path, job.chunk_rows, plan, schema.names)
        done = 0

        def next_chunk() -> tuple[pa.Table, dict[str, np.ndarray]] | None:
            tbl = next(chunks, None)
            if tbl is None:
                return None
            try:
                return tbl, build_feeds(tbl, plan)
            except JobError as e:
                raise JobError(f"rows {done}..{done + tbl.num_rows - 1}: {e}") from None

        def write(tbl: pa.Table, outputs: list[np.ndarray]) -> bool:
            for name, arr in zip(rt.output_names, outputs, strict=True):
                tbl = tbl.append_column(name, _output_array(arr))
            out.write(tbl)
            return self.store.progress(job.job_id, done + tbl.num_rows)

        try:
            while (item := await to_thread(next_chunk)) is not None:
                tbl, feeds = item
                outputs = await to_thread(score, rt, feeds, tbl.num_rows, done)
                running = await to_thread(write, tbl, outputs)
                done += tbl.num_rows
                if not running:
                    return False
                if self._stopping:
                    raise _Interrupted
            if out.writer is None:  # no rows: an empty file with the columns it would have had
                empty = schema.empty_table()
                for o in rt.outputs:
                    typ = _declared_type(o)
                    empty = empty.append_column(pa.field(o.name, typ), pa.array([], typ))
                await to_thread(out.write, empty)
        finally:
            chunks.close()
        # The commit point: once rows_done == rows_total is recorded, a cancel is refused.
        if not await to_thread(self.store.progress, job.job_id, done, rows_total=done):
            return False
        await to_thread(out.publish)
        return True


# -- the RPCs ----------------------------------------------------------------------------------
def _ts(ts: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(ts if ts.tzinfo else ts.replace(tzinfo=UTC))  # SQLite returns naive UTC
    return out


def job_pb(r: BatchJobRecord) -> pb.BatchJob:
    return pb.BatchJob(
        job_id=r.job_id, model=r.model, version=r.version, alias=r.alias, input_uri=r.input_uri,
        output_uri=r.output_uri, input_columns=list(r.input_columns), state=r.state,  # type: ignore[arg-type]
        rows_total=r.rows_total or 0, rows_done=r.rows_done, error=r.error, created_by=r.created_by,
        create_time=_ts(r.create_time), update_time=_ts(r.update_time), chunk_rows=r.chunk_rows)


class BatchJobsServicer:
    """The batch job RPCs, mixed into the InferenceService servicer. Attribute names are
    prefixed so they do not collide with the host class's."""

    def __init__(self, jobs: BatchJobStore, runner: BatchRunner) -> None:
        self.batch_jobs = jobs
        self.batch_runner = runner

    async def CreateBatchJob(self, request: pb.CreateBatchJobRequest,  # noqa: N802
                             context) -> pb.CreateBatchJobResponse:  # noqa: ANN001
        j, rid = request.job, request.request_id
        spec = {"model": j.model, "version": j.version, "alias": j.alias, "input_uri": j.input_uri,
                "output_uri": j.output_uri, "input_columns": list(j.input_columns), "chunk_rows": j.chunk_rows}
        validate_job(**spec)
        if rid and (prior := await asyncio.to_thread(self.batch_jobs.by_request_id, rid)) is not None:
            current_resource.set(f"batchJobs/{prior.job_id}")
            return pb.CreateBatchJobResponse(job=job_pb(prior))
        # Fail fast on what would only fail the job later: an unknown model, a missing input.
        self.batch_runner.check_paths(j.input_uri, j.output_uri)  # before anything looks at the host
        ref = await self.batch_runner.models.resolve(j.model, j.version, j.alias)
        if not await asyncio.to_thread(self.batch_runner.input_exists, j.input_uri):
            raise InvalidArgument("job.input_uri", f"no file at '{j.input_uri}'")
        rec, created = await asyncio.to_thread(
            self.batch_jobs.create, **spec, principal=current_principal.get().subject,
            worker_id=self.batch_runner.worker_id, request_id=rid, resolved_version=ref.version)
        current_resource.set(f"batchJobs/{rec.job_id}")
        if created:
            await self.batch_runner.submit(rec.job_id)
        return pb.CreateBatchJobResponse(job=job_pb(rec))

    async def GetBatchJob(self, request: pb.GetBatchJobRequest,  # noqa: N802
                          context) -> pb.GetBatchJobResponse:  # noqa: ANN001
        rec = await asyncio.to_thread(self.batch_jobs.get, request.job_id)
        return pb.GetBatchJobResponse(job=job_pb(rec))

    async def ListBatchJobs(self, request: pb.ListBatchJobsRequest,  # noqa: N802
                            context) -> pb.ListBatchJobsResponse:  # noqa: ANN001
        jobs, token = await asyncio.to_thread(self.batch_jobs.list, request.page_size, request.page_token)
        return pb.ListBatchJobsResponse(jobs=[job_pb(r) for r in jobs], next_page_token=token)

    async def CancelBatchJob(self, request: pb.CancelBatchJobRequest,  # noqa: N802
                             context) -> pb.CancelBatchJobResponse:  # noqa: ANN001
        current_resource.set(f"batchJobs/{request.job_id}")
        rec = await asyncio.to_thread(self.batch_jobs.cancel, request.job_id)
        return pb.CancelBatchJobResponse(job=job_pb(rec))
