"""BatchRunner: runs the batch jobs this process accepted, chunk_rows rows at a time: read
(pyarrow, streaming) -> numpy feeds (column by column, vectorised) -> the model (in a worker
thread) -> appended to the output file at a temporary location, published when every row is
scored. The job's row in the database (store.py) carries its state, progress and cancellation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from services.common.artifacts import ArtifactNotFound, ArtifactStore, LocalArtifactStore
from services.common.artifacts.local import check_key
from services.common.errors import InvalidArgument, StrataError
from services.common.paths import Confinement
from services.inference.batch_jobs.feeds import (
    JobError, build_feeds, declared_type, is_csv, output_array, plan_feeds, read_chunks, read_schema, score,
)
from services.inference.batch_jobs.output import Output
from services.inference.batch_jobs.store import FAILED, INTERRUPTED, SUCCEEDED, BatchJobRecord, BatchJobStore
from services.inference.model_store import LoadedModel, ModelRef

log = logging.getLogger("strata.inference.batch")


class _Interrupted(Exception):
    pass


class Models(Protocol):
    """What the runner needs of ModelStore."""

    async def resolve(self, model: str, version: int = 0, alias: str = "") -> ModelRef: ...

    async def load(self, ref: ModelRef) -> LoadedModel: ...


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
            out = Output(j.output_uri, j.job_id, self.artifacts, self.scratch_dir)
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

    def _cleanup(self, out: Output, job_id: str) -> None:
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
        out = Output(job.output_uri, job_id, self.artifacts, self.scratch_dir)
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

    async def _execute(self, job: BatchJobRecord, out: Output) -> bool:
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
        plan = plan_feeds(schema, rt.inputs, job.input_columns, text=is_csv(path))
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
                tbl = tbl.append_column(name, output_array(arr))
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
                    typ = declared_type(o)
                    empty = empty.append_column(pa.field(o.name, typ), pa.array([], typ))
                await to_thread(out.write, empty)
        finally:
            chunks.close()
        # The commit point: once rows_done == rows_total is recorded, a cancel is refused.
        if not await to_thread(self.store.progress, job.job_id, done, rows_total=done):
            return False
        await to_thread(out.publish)
        return True
