"""The prediction log: never blocks, delivers in batches, spools what the sink refuses and
delivers it later, counts what it had to drop."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from prometheus_client import REGISTRY

from services.inference.predlog import FileSink, PredictionLog
from services.inference.predlog_format import Encoder, read_records


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("strata_inference_prediction_log_total", {"outcome": outcome}) or 0.0


def _entry(i: int) -> tuple:
    x = np.full((1, 4), i, np.float32)
    return (time.time(), f"r{i}", "ep", "m", 1, 1, False, 0.5, {"input": x}, [("output", x[:, :2])], "")


class FlakySink:
    """Refuses the first `failures` writes (a monitoring service that is down), then appends."""

    def __init__(self, path: Path, failures: int) -> None:
        self.inner = FileSink(path)
        self.failures = failures

    def write(self, records: list[bytes]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("sink unavailable")
        self.inner.write(records)


def _wait(cond, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline:
        time.sleep(0.02)
    assert cond()


def test_refused_batches_are_spooled_then_delivered(tmp_path: Path) -> None:
    spooled, delivered = _count("spooled"), _count("delivered")
    sink = FlakySink(tmp_path / "log.binpb", failures=1)
    log = PredictionLog(sink, tmp_path / "spool", encode=Encoder().encode, interval=0.01, retry_seconds=0.2)
    for i in range(50):
        log.record(_entry(i))
    _wait(lambda: _count("spooled") - spooled == 50)
    assert list((tmp_path / "spool").glob("*.binpb"))
    _wait(lambda: _count("delivered") - delivered == 50)  # replayed once the sink accepts
    log.close()
    recs = read_records(tmp_path / "log.binpb")
    assert sorted(r.request_id for r in recs) == sorted(f"r{i}" for i in range(50))
    assert not list((tmp_path / "spool").glob("*.binpb"))
    r = recs[0]
    assert (r.endpoint, r.model, r.version, r.shadow) == ("ep", "m", 1, False)
    assert np.frombuffer(r.inputs[0].raw, np.float32).shape == (4,)


def test_a_full_queue_drops_and_counts_never_blocks(tmp_path: Path) -> None:
    dropped = _count("dropped")
    log = PredictionLog(FileSink(tmp_path / "log.binpb"), tmp_path / "spool", encode=Encoder().encode, capacity=10,
                        interval=5.0)
    for i in range(1000):  # the flusher sleeps 5 s: the queue fills, record() drops instead of waiting
        log.record(_entry(i))
    assert _count("dropped") - dropped == 990
    log.close()
    assert len(read_records(tmp_path / "log.binpb")) == 10


def test_fast_encoder_writes_the_same_records_as_protobuf() -> None:
    """The hot path's Encoder (cached wire fragments) must give exactly the message the protobuf
    runtime builds, for every kind of tensor and field combination."""
    from strata.inference.v1 import inference_pb2 as pb

    from services.inference.predlog_format import encode

    entries = [
        (time.time(), "abc-123", "bench", "bench-mlp", 1, 3, False, 0.51,
         {"input": np.random.default_rng(0).random((1, 32), np.float32)},
         [("output", np.ones((1, 2), np.float32))], ""),
        (1_700_000_000.0, "", "", "m", 2, 0, True, 0.0,
         {"a": np.array([["x", "yy"]], dtype=object), "b": np.zeros((0, 3), np.int64)}, [], "boom: failed"),
        (1_700_000_000.5, "r" * 300, "e", "m", 0, 0, False, 1.5,
         {"b": np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2]}, [("o", np.array([True, False]))], ""),
        (5.000000001, "x", "e", "m", 10**12, 2**40, False, -3.25, {"big": np.zeros((64, 300), np.float64)}, [], ""),
    ]
    enc = Encoder()
    for e in entries * 2:  # the second round hits the caches
        assert pb.PredictionRecord.FromString(enc.encode(e)) == pb.PredictionRecord.FromString(encode(e))


class RecordingSink:
    """Keeps what it is given, in order; refuses while `down` is set (a monitoring service that is down)."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.down = False

    def write(self, records: list[bytes]) -> None:
        if self.down:
            raise ConnectionError("sink unavailable")
        self.got += records


def _ids(records: list[bytes]) -> list[str]:
    from strata.inference.v1 import inference_pb2 as pb

    return [pb.PredictionRecord.FromString(r).request_id for r in records]


def test_while_the_spool_waits_new_batches_queue_behind_it_in_order(tmp_path: Path) -> None:
    sink = RecordingSink()
    sink.down = True
    log = PredictionLog(sink, tmp_path / "spool", encode=Encoder().encode, interval=0.01, retry_seconds=0.3)
    for i in range(30):
        log.record(_entry(i))
        time.sleep(0.002)  # spread over several 10 ms batches
    _wait(lambda: len(list((tmp_path / "spool").glob("*.binpb"))) >= 2)
    sink.down = False  # back up: the next batches must not overtake the spooled ones
    for i in range(30, 60):
        log.record(_entry(i))
    _wait(lambda: len(sink.got) == 60)
    log.close()
    assert _ids(sink.got) == [f"r{i}" for i in range(60)]
    assert not list((tmp_path / "spool").glob("*.binpb"))


def test_logs_sharing_a_spool_deliver_each_spooled_batch_once(tmp_path: Path) -> None:
    """The serving processes of one service share the spool directory: each replays it, a file
    lock keeps two of them from sending the same file."""
    from services.inference.predlog import frame

    spool = tmp_path / "spool"
    spool.mkdir()
    enc = Encoder().encode
    for f in range(40):
        (spool / f"{f:020d}-1-00000000.binpb").write_bytes(frame([enc(_entry(f * 10 + i)) for i in range(10)]))
    sinks = [RecordingSink() for _ in range(3)]
    logs = [PredictionLog(s, spool, encode=enc, batch=10, interval=0.01, retry_seconds=0.05) for s in sinks]
    _wait(lambda: not list(spool.glob("*.binpb")))
    for log in logs:
        log.close()
    got = [rid for s in sinks for rid in _ids(s.got)]
    assert sorted(got) == sorted(f"r{i}" for i in range(400)) and len(got) == 400
    for s in sinks:  # each process replays oldest first
        ids = [int(r[1:]) for r in _ids(s.got)]
        assert ids == sorted(ids)


def test_a_damaged_spool_file_is_moved_aside_and_the_rest_delivered(tmp_path: Path) -> None:
    from services.inference.predlog import frame

    spool = tmp_path / "spool"
    spool.mkdir()
    enc = Encoder().encode
    (spool / f"{1:020d}-1-00000000.binpb").write_bytes(frame([enc(_entry(0))])[:-3])  # cut short
    (spool / f"{2:020d}-1-00000000.binpb").write_bytes(frame([enc(_entry(1))]))
    sink = RecordingSink()
    log = PredictionLog(sink, spool, encode=enc, interval=0.01, retry_seconds=0.05)
    _wait(lambda: len(sink.got) == 1)
    log.record(_entry(2))
    _wait(lambda: len(sink.got) == 2)
    log.close()
    assert _ids(sink.got) == ["r1", "r2"]
    assert [p.name for p in (spool / "corrupt").iterdir()] == [f"{1:020d}-1-00000000.binpb"]
