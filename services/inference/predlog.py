"""The prediction log: every prediction (inputs, outputs, model version, latency, request id,
endpoint, shadow flag) leaves the hot path through a bounded in-memory queue that a background
thread drains in batches into a sink.

The hot path encodes the record (about 2 us: the wire bytes are put together from fragments
cached per endpoint/version and tensor layout, see predlog_format.Encoder) and appends it to a
deque: no lock, no I/O. The thread only writes, every 20 ms. (Encoding in the thread instead cost
the event loop more than encoding inline: the thread took the GIL whenever the loop released it,
in ONNX Runtime and in grpc, 7 % of the requests/s at 8 streams.) When the queue is full the
record is counted as dropped (`strata_inference_prediction_log_total{outcome="dropped"}`), never
silently lost and never allowed to block a caller. A batch the sink fails to take is spooled to a
local file (fsync'd) and retried every `retry_seconds`; until the spool is delivered, new batches
join it behind, so the sink receives records in the order they were made. Records the receiver
refuses for good are set aside by the sink and counted (`rejected`); spooled and delivered records
are counted too.

Records are strata.inference.v1.PredictionRecord messages, length-delimited (varint size, then the
message), the same messages the monitoring service ingests. The record's encoding is the wire
format's (services/inference/predlog_format.py), handed in as `encode`; the framing, the queue,
the spool and the counters are here.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import numpy as np
from prometheus_client import Counter

log = logging.getLogger("strata.inference.predlog")
LOGGED = Counter("strata_inference_prediction_log", "Prediction log records by outcome", ["outcome"])

# (time, request_id, endpoint, model, version, revision, shadow, latency_ms, inputs, outputs, error)
Entry = tuple[float, str, str, str, int, int, bool, float, dict[str, np.ndarray], list[tuple[str, np.ndarray]], str]


Encode = Callable[[Entry], bytes]


class Sink(Protocol):
    def write(self, records: list[bytes]) -> int | None:
        """Deliver `records`, in order; called from the log's thread only. Raise to have them
        spooled and written again later (so a write must be safe to repeat). Return how many of
        them the receiver refused for good (the sink sets those aside; they are counted as
        `rejected` and never retried), or None when it took them all."""
        ...


def varint(n: int) -> bytes:
    """n as a protobuf base-128 varint."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def frame(records: Iterable[bytes]) -> bytes:
    """Length-delimited: each record's size as a base-128 varint, then the record."""
    return b"".join(varint(len(r)) + r for r in records)


def read_frames(path: Path) -> list[bytes]:
    """The records of a length-delimited file, as written (ValueError if it is cut short)."""
    return parse_frames(path.read_bytes(), str(path))


def parse_frames(data: bytes, where: str) -> list[bytes]:
    """The records of length-delimited bytes (ValueError, naming `where`, if they are cut short)."""
    pos, out = 0, []
    while pos < len(data):
        size, shift = 0, 0
        while True:
            if pos >= len(data) or shift > 28:
                raise ValueError(f"{where}: truncated or corrupt record size at byte {pos}")
            b = data[pos]
            pos += 1
            size |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if pos + size > len(data):
            raise ValueError(f"{where}: record of {size} bytes cut short at byte {pos}")
        out.append(data[pos:pos + size])
        pos += size
    return out


class FileSink:
    """Append-only local file, one per serving process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, records: list[bytes]) -> None:
        with self.path.open("ab") as f:
            f.write(frame(records))


class PredictionLog:
    def __init__(self, sink: Sink, spool_dir: Path, *, encode: Encode, capacity: int = 100_000, batch: int = 4096,
                 interval: float = 0.02, retry_seconds: float = 5.0) -> None:
        """`encode`: an entry's record bytes (predlog_format.Encoder().encode), called on the hot path.
        `spool_dir` may be shared by the serving processes of one service: each replays every
        spooled batch, and a file lock makes sure one of them at a time does."""
        self.sink = sink
        self.spool_dir = spool_dir
        self.capacity = capacity
        self._batch = batch
        self._interval = interval
        self._retry = retry_seconds
        self._queue: deque[bytes] = deque()
        self._encode = encode
        self._backlog = False  # a write failed: later batches join the spool behind it, in order
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._dropped = LOGGED.labels("dropped")
        self._thread.start()

    def record(self, entry: Entry) -> None:
        """Hot path: O(1), never blocks."""
        if not self.capacity:  # logging disabled explicitly (and loudly, at start)
            return
        if len(self._queue) >= self.capacity:
            self._dropped.inc()
            return
        self._queue.append(self._encode(entry))

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued (to the sink, or to the spool while the sink fails), then stop."""
        self._stop.set()
        self._thread.join(timeout)

    # -- the background thread ---------------------------------------------------------------
    def _run(self) -> None:
        next_retry = time.monotonic()  # the spool an earlier life left is replayed at once
        while True:
            stopping = self._stop.wait(self._interval)
            try:
                if time.monotonic() >= next_retry:
                    self._backlog = not self._replay_spool()
                    next_retry = time.monotonic() + self._retry
                while self._queue:
                    records = self._drain()
                    # While the spool holds undelivered batches, new ones go behind them: the sink
                    # sees records in the order they were made, and a sink that is down is tried
                    # once per retry, not every 20 ms.
                    if self._backlog:
                        self._spool(records, None)
                    elif not self._flush(records):
                        self._backlog = True
                        next_retry = time.monotonic() + self._retry
                    # One batch a tick unless full batches wait: what arrived while a slow sink
                    # (a network call) took the last one waits for the next tick, rather than
                    # going at once in a stream of its own, a few records at a time.
                    if not stopping and len(self._queue) < self._batch:
                        break
            except Exception:  # the thread must outlive any surprise, or logging stops for good
                log.exception("prediction log: unexpected failure; continuing")
            if stopping:
                return

    def _drain(self) -> list[bytes]:
        out = []
        for _ in range(min(self._batch, len(self._queue))):
            out.append(self._queue.popleft())
        return out

    def _deliver(self, records: list[bytes]) -> None:
        """Raises what the sink raises; counts what it took and what it refused for good."""
        refused = self.sink.write(records) or 0
        LOGGED.labels("delivered").inc(len(records) - refused)
        if refused:
            LOGGED.labels("rejected").inc(refused)

    def _flush(self, records: list[bytes]) -> bool:
        try:
            self._deliver(records)
            return True
        except Exception as exc:
            self._spool(records, exc)
            return False

    def _spool(self, records: list[bytes], exc: Exception | None) -> None:
        """Write a batch to the spool (fsync'd: the records survive a crash of the host); names
        sort by creation time."""
        path = self.spool_dir / f"{time.time_ns():020d}-{os.getpid()}-{next(self._seq):08d}.binpb"
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with tmp.open("wb") as f:
                f.write(frame(records))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            LOGGED.labels("spooled").inc(len(records))
        except OSError:
            LOGGED.labels("dropped").inc(len(records))
            log.exception("prediction log: sink and spool both failed; records dropped")
            return
        if exc is not None:  # the first failure says why; the batches queued behind it are quiet
            log.warning("prediction log sink failed; records spooled and retried every %.0f s", self._retry,
                        extra={"fields": {"records": len(records), "spool": str(path), "error": str(exc)}})

    def _replay_spool(self) -> bool:
        """Deliver the spooled batches, oldest first, up to `batch` records a write. False when the
        sink still fails (what was not delivered stays for the next round). Files another process
        is replaying are left to it."""
        if not self.spool_dir.is_dir():
            return True
        with ExitStack() as held:
            taken: list[Path] = []
            records: list[bytes] = []
            for path in sorted(self.spool_dir.glob("*.binpb")):
                data = self._take(path, held)
                if data is None:
                    continue
                try:
                    records += parse_frames(data, str(path))
                except ValueError:
                    self._quarantine(path)
                    continue
                taken.append(path)
                if len(records) >= self._batch:
                    if not self._deliver_spooled(taken, records):
                        return False
                    held.close()
                    taken, records = [], []
            return self._deliver_spooled(taken, records) if taken else True

    @staticmethod
    def _take(path: Path, held: ExitStack) -> bytes | None:
        """The file's bytes, locked until `held` closes; None when another process holds it or
        has delivered it already."""
        try:
            f = held.enter_context(path.open("rb"))
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(f.fileno()).st_ino != os.stat(path).st_ino:
                return None
        except (BlockingIOError, FileNotFoundError):
            return None
        return f.read()

    def _deliver_spooled(self, paths: list[Path], records: list[bytes]) -> bool:
        try:
            self._deliver(records)
        except Exception:
            return False
        for path in paths:  # delivered: the files go (while still locked, so nobody sends them again)
            path.unlink(missing_ok=True)
        return True

    def _quarantine(self, path: Path) -> None:
        """A spool file that does not parse (a damaged disk) is moved aside, never retried."""
        aside = self.spool_dir / "corrupt"
        aside.mkdir(exist_ok=True)
        os.replace(path, aside / path.name)
        log.error("prediction log: a spool file is damaged; moved aside",
                  extra={"fields": {"path": str(aside / path.name)}})
