"""A job's output file: written at a temporary place, published to output_uri in one step only
when every row is scored, so a failed or cancelled job leaves nothing there."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from services.common.artifacts import ArtifactStore

PART_BYTES = 16 << 20  # staged-upload part size for outputs going to the artifact store


class Output:
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
