"""The prediction store's write path without gRPC, on SQLite and PostgreSQL: the write-ahead log's
crash cases (a torn last frame, a compaction cut short), a batch refused whole, the idempotency
index when it forgets and when hashes collide, and the backlog limit."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from services.common.artifacts import LocalArtifactStore
from services.common.db import Database
from services.common.errors import InvalidArgument, Unavailable
from services.monitoring import index as index_module
from services.monitoring.rows import ID, records_table
from services.monitoring.store import PredictionStore
from services.monitoring.types import RecordGroup, Target, Window

DAY = 86_400_000_000


def group(prefix: str, n: int, *, day: int = 0, model: str = "m", version: int = 1,
          x_dtype: type = np.float32) -> pa.Table:
    """n single-row records "{prefix}-{i}" of endpoint "e", `day` days before now."""
    t = int(time.time() * 1e6) - day * DAY
    g = RecordGroup("e", model, version, False, [f"{prefix}-{i}" for i in range(n)], np.ones(n, np.int64),
                    np.full(n, t, np.int64), [""] * n, [("x", np.arange(n).astype(x_dtype).reshape(n, 1))],
                    [("y", np.arange(n, dtype=np.int64))], list(range(n)))
    return records_table(g)


def open_store(db: Database, home: Path, **kw: int) -> PredictionStore:
    store = PredictionStore(db, LocalArtifactStore(home / "artifacts"), home / "wal", **kw)
    store.open()
    return store


def crash(store: PredictionStore) -> None:
    """The process dies: nothing compacted, the log as it is on disk (its lock released)."""
    store.wal.close()


def ids(store: PredictionStore, days: int = 1) -> list[str]:
    now = datetime.now(UTC)
    rows = store.scan(Target("e", "", 0), Window(now - timedelta(days=days + 1), now + timedelta(hours=1)))
    return sorted(rows.column(ID).to_pylist()) if rows.num_rows else []


def test_a_torn_last_frame_is_dropped_and_the_complete_frames_replayed(db: Database, tmp_path: Path) -> None:
    store = open_store(db, tmp_path)
    for b in range(3):
        assert store.append([(group(f"b{b}", 100), "records")]) == 100
    store.sync()
    segment = store.wal.path(store.wal.seq)
    crash(store)
    with open(segment, "r+b") as f:  # the last frame was being written when the process died
        f.truncate(segment.stat().st_size - 7)
    store = open_store(db, tmp_path)
    assert ids(store) == sorted(f"b{b}-{i}:0" for b in range(2) for i in range(100))
    assert not segment.exists() and store.wal.segments() == [store.wal.seq]  # replayed into Parquet
    assert store.append([(group("b2", 100), "records")]) == 100  # the torn batch was not stored


def test_a_compaction_cut_short_is_replayed_without_storing_a_row_twice(db: Database, tmp_path: Path) -> None:
    store = open_store(db, tmp_path)
    store.append([(group("c", 50), "records"), (group("old", 20, day=3), "records")])
    store.sync()
    # Compaction wrote the files and entered them, then the process died before removing the segment.
    seq = store.wal.rotate()
    store._catalog(store._write_files(seq, store._pending[seq]))
    crash(store)
    store = open_store(db, tmp_path)
    assert ids(store, days=4) == sorted([f"c-{i}:0" for i in range(50)] + [f"old-{i}:0" for i in range(20)])
    assert len(list((tmp_path / "artifacts").rglob("*.parquet"))) == 2
    assert store.append([(group("c", 50), "records"), (group("old", 20, day=3), "records")]) == 0


def test_a_batch_with_a_column_of_another_type_is_refused_whole(db: Database, tmp_path: Path) -> None:
    store = open_store(db, tmp_path)
    store.append([(group("a", 10), "records")])
    store.compact()
    batch = [(group("b", 10), "records"), (group("c", 10, x_dtype=np.float64), "records[1]")]
    with pytest.raises(InvalidArgument) as e:
        store.append(batch)
    assert e.value.field == "records[1]" and "'input.x' holds double" in e.value.message
    with pytest.raises(InvalidArgument):  # within one batch too
        store.append([(group("d", 5, model="n"), "records"), (group("d2", 5, model="n", x_dtype=np.int64), "x")])
    assert ids(store) == sorted(f"a-{i}:0" for i in range(10))
    assert store.append(batch[:1]) == 10  # nothing of the refused batch counted as stored


def test_an_endpoints_versions_are_read_together_whatever_their_column_types(db: Database, tmp_path: Path) -> None:
    store = open_store(db, tmp_path)
    store.append([(group("v1", 3), "records")])
    store.append([(group("v2", 2, version=2, x_dtype=np.float64), "records")])  # another version: its own type
    store.compact()
    store.append([(group("v2b", 2, version=2, x_dtype=np.float64), "records")])  # pending, beside the files
    now = datetime.now(UTC)
    rows = store.scan(Target("e", "", 0), Window(now - timedelta(hours=1), now + timedelta(hours=1)))
    got = sorted(zip(rows.column("version").to_pylist(), rows.column("input.x").to_pylist(), strict=True))
    assert got == [(1, 0.0), (1, 1.0), (1, 2.0), (2, 0.0), (2, 0.0), (2, 1.0), (2, 1.0)]
    only_outputs = store.scan(Target("", "m", 2), Window(now - timedelta(hours=1), now + timedelta(hours=1)),
                              lambda name: name.startswith("output."))
    assert "input.x" not in only_outputs.column_names and only_outputs.num_rows == 4


def test_pending_rows_without_a_column_the_files_hold_read_it_as_null(db: Database, tmp_path: Path) -> None:
    # A version's records carry output y; an Arrow batch of the same version that came later does
    # not. Whether the first rows were compacted yet must not matter (it once made scan fail).
    store = open_store(db, tmp_path)
    store.append([(group("full", 3), "records")])
    store.compact()
    store.append([(group("bare", 2).drop_columns(["output.y"]), "arrow_ipc")])
    now = datetime.now(UTC)
    rows = store.scan(Target("e", "", 0), Window(now - timedelta(hours=1), now + timedelta(hours=1)))
    got = sorted(zip(rows.column(ID).to_pylist(), rows.column("output.y").to_pylist(), strict=True))
    assert got == [("bare-0:0", None), ("bare-1:0", None), ("full-0:0", 0), ("full-1:0", 1), ("full-2:0", 2)]


def test_ids_dropped_from_memory_are_found_again_in_the_files(db: Database, tmp_path: Path) -> None:
    store = open_store(db, tmp_path, index_max_ids=150)
    for day in range(4):  # four partitions of 100 ids; the index holds at most two at once
        store.append([(group(f"d{day}", 100, day=day), "records")])
        store.compact()
    assert sum(store.append([(group(f"d{day}", 100, day=day), "records")]) for day in range(4)) == 0
    assert len(ids(store, days=4)) == 400


def test_ids_whose_hashes_collide_are_told_apart_by_their_crc(db: Database, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_hashes", lambda ids: np.zeros(len(ids), np.int64))  # every id collides
    monkeypatch.setattr(index_module, "MERGE_IDS", 1)  # every id goes to the fingerprints at once
    store = open_store(db, tmp_path)
    assert store.append([(group("h", 30), "records")]) == 30
    assert store.append([(group("k", 30), "records")]) == 30  # every hash known, no id stored: kept
    store.compact()
    store.index.forget()  # loaded again from the files
    assert store.append([(group("k", 40), "records")]) == 10  # k-30..k-39 are new
    assert len(ids(store)) == 70


def test_ingestion_is_refused_while_too_many_rows_wait_for_compaction(db: Database, tmp_path: Path) -> None:
    store = open_store(db, tmp_path, compact_rows=10)
    store.append([(group("w", 45), "records")])
    with pytest.raises(Unavailable):
        store.append([(group("v", 1), "records")])
    assert store.due.is_set()
    store.compact()
    assert store.append([(group("v", 1), "records")]) == 1


def test_one_process_per_log_directory(db: Database, tmp_path: Path) -> None:
    store = open_store(db, tmp_path)
    with pytest.raises(RuntimeError, match="in use by another monitoring process"):
        PredictionStore(db, LocalArtifactStore(tmp_path / "artifacts"), tmp_path / "wal")
    store.close()
    open_store(db, tmp_path).close()
