"""The write-ahead log: where ingested rows are durable before they are acknowledged, until the
compactor has moved them into Parquet files on the artifact store.

The log is a directory of segments, `<seq>.wal` (seq increasing, 12 digits), each a run of
frames: payload size (uint32, little-endian), CRC-32 of the payload (uint32), payload. A frame is
appended with one write; `sync` fsyncs the segment being appended to; `rotate` fsyncs and closes
it and starts the next, so everything written before a `sync` or a `rotate` returns is on disk.

A crash can leave only the last frame of the last segment written in part (nothing is appended
after a failed write: the segment is cut back to the frame's start and a new one started).
`recover` reads every segment up to its first frame that is short or fails its CRC, cuts the file
there and returns the complete frames: none of an acknowledged frame is lost, and no frame is
returned in part.

One process owns a log directory (an exclusive `flock` on its LOCK file, held while open): a
second monitoring process on the same STRATA_HOME refuses to start.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import threading
import zlib
from pathlib import Path

_HEADER = struct.Struct("<II")
_SEGMENT = re.compile(r"^(\d{12})\.wal\Z")
#: A frame's payload is at most this large (a batch is bounded by the gRPC message size).
MAX_FRAME_BYTES = 1 << 31


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteAheadLog:
    """Not thread-safe for appends and rotations (the caller serialises them); `sync` may run in
    any thread at any time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"{directory} is in use by another monitoring process (one process per "
                               "STRATA_HOME)") from None
        self._fd: int | None = None
        self.seq = 0
        self._guard = threading.Lock()  # the current fd, against a sync racing a rotation

    def segments(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _SEGMENT.match(p.name)))

    def path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.wal"

    def recover(self) -> list[tuple[int, list[bytes]]]:
        """The complete frames of every segment, by segment; torn tails are cut off. Call before
        `open`."""
        out = []
        for seq in self.segments():
            path = self.path(seq)
            data = path.read_bytes()
            frames, pos = [], 0
            while pos + _HEADER.size <= len(data):
                size, crc = _HEADER.unpack_from(data, pos)
                end = pos + _HEADER.size + size
                if end > len(data) or zlib.crc32(data[pos + _HEADER.size:end]) != crc:
                    break
                frames.append(data[pos + _HEADER.size:end])
                pos = end
            if pos < len(data):
                with open(path, "r+b") as f:
                    f.truncate(pos)
                    os.fsync(f.fileno())
            out.append((seq, frames))
            self.seq = max(self.seq, seq)
        return out

    def open(self) -> None:
        """Start a new segment after the existing ones."""
        with self._guard:
            self._start(self.seq + 1)

    def _start(self, seq: int) -> None:
        fd = os.open(self.path(seq), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        _fsync_dir(self.directory)  # the new segment's name is durable before anything relies on it
        self._fd, self.seq = fd, seq

    def append(self, payload: bytes | memoryview) -> int:
        """Write one frame to the current segment (not yet synced); returns the segment's seq. On a
        failed write the segment is cut back to before the frame and a new segment started, so no
        torn frame ever has frames after it."""
        if len(payload) >= MAX_FRAME_BYTES:
            raise ValueError(f"frame of {len(payload)} bytes is too large")
        if self._fd is None:
            raise OSError("the write-ahead log has no open segment")
        header = _HEADER.pack(len(payload), zlib.crc32(payload))
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            written = os.writev(self._fd, [header, payload])
            if written != len(header) + len(payload):
                raise OSError(f"short write to the write-ahead log ({written} bytes)")
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            finally:
                self.rotate()
            raise
        return self.seq

    def sync(self) -> None:
        """Everything appended so far is on disk when this returns."""
        with self._guard:
            if self._fd is None:  # closed
                return
            fd = os.dup(self._fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rotate(self) -> int:
        """Sync and close the current segment and start the next; returns the closed segment's seq."""
        closed = self.seq
        # Under the guard throughout: a `sync` waits for the closed segment's fsync, then syncs
        # the new one (returning early would acknowledge rows not yet on disk).
        with self._guard:
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._start(closed + 1)
        return closed

    def remove(self, seq: int) -> None:
        """Drop a segment whose rows are stored elsewhere."""
        self.path(seq).unlink(missing_ok=True)
        _fsync_dir(self.directory)

    def close(self) -> None:
        with self._guard:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.fsync(fd)
            os.close(fd)
        os.close(self._lock_fd)
