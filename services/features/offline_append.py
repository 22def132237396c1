"""Pushed rows appended to a view's offline source (one Parquet file per push), so that a
training set built later sees exactly what serving saw. Only for sources that name a directory
or a `dir/*.parquet` glob (local or on S3, see files.py); the file appears under its final name
only when complete, so a concurrent reader never sees half a file."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from services.features.definitions import ViewDef
from services.features.files import OfflineFiles
from services.features.online import FLOATS, INTS
from services.features.types import DataType, KeyColumn, ValueType

log = logging.getLogger("strata.features.offline")
_ARROW = {DataType.FLOAT32: pa.float32(), DataType.FLOAT64: pa.float64(), DataType.INT32: pa.int32(),
          DataType.INT64: pa.int64(), DataType.BOOL: pa.bool_(), DataType.STRING: pa.string()}


class Compactor:
    """Merges the one-file-per-push Parquet files of a source directory once `threshold` pushes
    reached it through this process, so that a steady stream of pushes does not leave millions of
    small files for every training set and materialization to list and open.

    Order is what point-in-time ties depend on (later file, then later row, wins), so a run of
    consecutive push files (by name) with one schema becomes one file with their rows in the same
    order, named after the run's last file plus `.c` (`push-<t>-<id>.c.parquet` sorts just before
    `push-<t>-<id>.parquet`, after every earlier file and before every later push). The merged file
    is written whole first, then the originals are deleted: a reader in between, or a crash, sees
    some rows twice, and duplicates never change a point-in-time result. One process per host
    compacts a directory at a time (an flock); feature services on several hosts writing to one
    S3 prefix may both merge the same run, which again only duplicates rows."""

    def __init__(self, files: OfflineFiles, threshold: int = 64) -> None:
        self.files = files
        self.threshold = threshold
        self._counts: dict[str, int] = {}
        self._running: set[str] = set()
        self._lock = threading.Lock()

    def pushed(self, directory: str) -> None:
        """After each push to `directory`: start a compaction in the background when due."""
        with self._lock:
            n = self._counts[directory] = self._counts.get(directory, 0) + 1
            if n < self.threshold or directory in self._running:
                return
            self._counts[directory] = 0
            self._running.add(directory)
        threading.Thread(target=self._background, args=(directory,), name="offline-compaction", daemon=True).start()

    def _background(self, directory: str) -> None:
        try:
            merged = self.compact(directory)
            log.info("compacted pushed files", extra={"fields": {"directory": directory, "files": merged}})
        except Exception:  # the pushes themselves are safe; the next threshold tries again
            log.exception("compacting pushed files failed", extra={"fields": {"directory": directory}})
        finally:
            with self._lock:
                self._running.discard(directory)

    def compact(self, directory: str) -> int:
        """Merge the push files in `directory` now; returns how many files were merged away.
        Runs of raw push files always merge; runs of merged (`.c`) files only once there are
        `threshold` of them, so a big merged file is rewritten once per `threshold` merges, not
        on every one."""
        with self._exclusive(directory) as mine:
            if not mine:
                return 0
            names = self.files.listing(directory, "push-")
            merged_files = sum(".c." in n.rsplit("/", 1)[-1] for n in names)
            runs: list[list[str]] = []
            key = None
            for name in names:
                this = (".c." in name.rsplit("/", 1)[-1], self.files.read_schema(name))
                if runs and key is not None and key[0] == this[0] and key[1].equals(this[1]):
                    runs[-1].append(name)
                else:
                    runs.append([name])
                key = this
            done = 0
            for run in runs:
                is_merged = ".c." in run[0].rsplit("/", 1)[-1]
                if len(run) >= 2 and (not is_merged or merged_files >= self.threshold):
                    done += self._merge(directory, run)
            return done

    def _merge(self, directory: str, run: list[str]) -> int:
        last = run[-1].rsplit("/", 1)[-1]
        self.files.add_file(directory, last.removesuffix(".parquet") + ".c.parquet",
                            pa.concat_tables([self.files.read_file(n) for n in run]))
        for name in run:
            self.files.delete(name)
        return len(run)

    @contextlib.contextmanager
    def _exclusive(self, directory: str) -> Iterator[bool]:
        """One compaction of a directory at a time across this host's serving processes (they
        share STRATA_HOME, where the lock files live); hosts do not coordinate."""
        self.files.cache_dir.mkdir(parents=True, exist_ok=True)
        where = directory if directory.startswith("s3://") else os.path.realpath(directory)
        digest = hashlib.sha256(where.encode()).hexdigest()[:24]
        with open(self.files.cache_dir / f"compact-{digest}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process is compacting this directory
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def make_appender(files: OfflineFiles, compactor: Compactor | None = None) -> Callable[..., None]:
    def append(view: ViewDef, entities: Mapping[str, KeyColumn], event_us: np.ndarray, columns: dict,
               nulls: dict) -> None:
        spec = view.spec
        directory = files.append_dir(spec.source.path) if spec.source.path and spec.source.timestamp_field \
            else None
        if directory is None:
            return
        data: dict[str, pa.Array] = {}
        for e in view.entities:
            col = entities[e.join_key]
            data[e.join_key] = (pa.array(list(col.int64_values), pa.int64()) if e.value_type == ValueType.INT64
                                else pa.array(list(col.string_values), pa.string()))
        for f in spec.features:
            values = columns[f.name]
            if f.dtype in FLOATS | INTS or f.dtype == DataType.BOOL:
                values = values.tolist()
            data[f.name] = pa.array(values, _ARROW[f.dtype], mask=np.asarray(nulls[f.name]))
        data[spec.source.timestamp_field] = pa.array(event_us, pa.timestamp("us", tz="UTC"))
        if spec.source.created_timestamp_field:
            now = int(time.time() * 1e6)
            data[spec.source.created_timestamp_field] = pa.array([now] * len(event_us), pa.timestamp("us", tz="UTC"))
        files.add_file(directory, f"push-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet", pa.table(data))
        if compactor is not None:
            compactor.pushed(directory)
    return append
