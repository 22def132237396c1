"""Records read from the wire bytes (wire.py) give the same batches as read by the protobuf
runtime, whatever mix of layouts a message holds; those the byte reader does not take go to the
runtime, and bytes that are not a request are refused as undecodable."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strata.inference.v1 import inference_pb2 as ipb
from strata.monitoring.v1 import monitoring_pb2 as pb

from services.common.errors import InvalidArgument, StrataError, UndecodableRequest
from services.inference.predlog_format import Encoder
from services.monitoring import convert, wire
from services.monitoring.rows import arrow_table, records_table
from services.monitoring.types import ArrowBatch


def encoded(rid: str, inputs: dict, outputs: list, *, endpoint: str = "e", version: int = 1, shadow: bool = False,
            error: str = "", when: float | None = None) -> bytes:
    entry = (time.time() if when is None else when, rid, endpoint, "m", version, 3, shadow, 2.5, inputs, outputs,
             error)
    return Encoder().encode(entry)


def request(records: list[bytes]) -> bytes:
    return pb.IngestPredictionsRequest(records=[ipb.PredictionRecord.FromString(r) for r in records]).SerializeToString()


def by_runtime(data: bytes) -> list:
    msg = pb.IngestPredictionsRequest.FromString(data)
    return convert.record_groups(msg.records, list(range(len(msg.records))))


def rows_of(groups: list) -> list[dict]:
    """Every stored row, sorted by id: what the two readers must agree on."""
    out = []
    for g in groups:
        out += records_table(g).to_pylist()
    return sorted(out, key=lambda r: r["prediction_id"])


def test_the_byte_reader_and_the_runtime_agree_on_every_layout() -> None:
    rng = np.random.default_rng(0)
    recs = []
    for i in range(40):  # single-row records of two endpoints and a shadow version
        recs.append(encoded(f"r{i}", {"a": rng.random((1, 1), np.float32), "b": rng.integers(0, 9, (1, 1))},
                            [("label", np.array([i % 2])), ("probabilities", rng.random((1, 2), np.float32))],
                            endpoint="e" if i % 3 else "f", version=1 + (i % 4 == 0), shadow=i % 4 == 0))
    recs.append(encoded("batch", {"a": rng.random((7, 1), np.float32), "b": rng.integers(0, 9, (7, 1))},
                        [("label", np.arange(7)), ("probabilities", rng.random((7, 2), np.float32))]))
    recs.append(encoded("matrix", {"x": rng.random((3, 4))}, [("y", rng.random(3))]))
    recs.append(encoded("x" * 200, {"x": rng.random((1, 4))}, [("y", rng.random(1))]))  # 2-byte id length
    recs.append(encoded("epoch", {"x": rng.random((1, 4))}, [("y", rng.random(1))], when=0.0))
    # What the runtime reads: an error record, strings, a record built by the protobuf runtime with
    # value lists.
    recs.append(encoded("failed", {"a": rng.random((1, 1), np.float32), "b": rng.integers(0, 9, (1, 1))}, [],
                        error="model failed"))
    recs.append(encoded("text", {"city": np.array([["paris"]], dtype=object)}, [("y", rng.random(1))]))
    built = ipb.PredictionRecord(request_id="values", endpoint="e", model="m", version=1, inputs=[
        ipb.Tensor(name="x", dtype=2, shape=[1, 4], float_values=[1, 2, 3, 4])], outputs=[
        ipb.Tensor(name="y", dtype=2, shape=[1], float_values=[0.5])])
    built.time.FromNanoseconds(int(time.time() * 1e9))
    recs.append(built.SerializeToString())
    data = request(recs)
    req = wire.split(data)
    fast, slow = wire.record_groups(data, req.records, convert.NUMPY_OF)
    assert slow == [len(recs) - 3, len(recs) - 2, len(recs) - 1]
    assert sum(len(g.request_ids) for g in fast) == len(recs) - 3
    assert rows_of(convert.batch(data)) == rows_of(by_runtime(data))  # every value, id, time and flag


def test_a_tensor_that_differs_from_its_groups_template_goes_to_the_runtime() -> None:
    rng = np.random.default_rng(1)
    same = [encoded(f"s{i}", {"a": rng.random((1, 1), np.float32)}, [("y", rng.random(1))]) for i in range(5)]
    renamed = encoded("other", {"z": rng.random((1, 1), np.float32)}, [("y", rng.random(1))])  # same length
    data = request(same + [renamed])
    fast, slow = wire.record_groups(data, wire.split(data).records, convert.NUMPY_OF)
    assert slow == [5] and [len(g.request_ids) for g in fast] == [5]
    assert rows_of(convert.batch(data)) == rows_of(by_runtime(data))


def test_bytes_that_are_not_a_request_are_undecodable_and_bad_records_are_named() -> None:
    with pytest.raises(UndecodableRequest):
        convert.batch(b"\x0a\x05ab")  # a record cut short
    with pytest.raises(UndecodableRequest):
        convert.batch(b"\x0a\x03\xff\xff\xff")  # a record that is not a PredictionRecord
    short = ipb.PredictionRecord(request_id="r", model="m", version=1, inputs=[
        ipb.Tensor(name="x", dtype=1, shape=[2, 1], raw=b"\x00" * 4)])
    with pytest.raises(InvalidArgument) as e:
        convert.batch(pb.IngestPredictionsRequest(records=[short]).SerializeToString())
    assert e.value.field == "records[0].inputs[0].raw"


_VALID = request([encoded(f"f{i}", {"a": np.full((1, 1), i, np.float32), "b": np.full((1, 2), i, np.int64)},
                          [("y", np.array([0.5]))]) for i in range(6)])


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.integers(0, len(_VALID)))
def test_damaged_bytes_are_refused_by_name_never_with_an_internal_error(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_VALID)
    for at, value in edits:
        data[at] = value
    try:
        got = convert.batch(bytes(data[:cut] if cut else data))
        if isinstance(got, ArrowBatch):
            arrow_table(got)
        else:
            for g in got:
                records_table(g)
    except StrataError as e:
        assert e.code.name == "INVALID_ARGUMENT", e


def test_a_name_that_is_not_utf8_is_refused_by_name() -> None:
    """Found by the test above in CI: the fast path read a record's head with the runtime, whose
    DecodeError escaped as INTERNAL."""
    data = bytearray(_VALID)
    at = bytes(data).index(b"\x1a\x01m")  # the first record's model name "m" (field 3)
    data[at + 2] = 0xFF
    with pytest.raises(StrataError) as e:
        convert.batch(bytes(data))
    assert e.value.code.name == "INVALID_ARGUMENT", e.value
