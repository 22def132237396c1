"""The hand-written protobuf wire pieces against the protobuf library's own encoding."""

from __future__ import annotations

import pytest
from google.protobuf import wrappers_pb2
from strata.features.v1 import features_pb2 as pb

from services.features import wire


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**21 - 1, 2**21, 2**35 + 7, 2**63 - 1])
def test_varint(n: int) -> None:
    # After the tag of field 1 (proto3 writes no field for 0, whose varint is one zero byte).
    expected = wrappers_pb2.UInt64Value(value=n).SerializeToString()[1:] or b"\x00"
    assert wire.varint(n) == expected
    assert wire.varint(n) == expected  # the second time from the small-number cache


def test_negative_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        wire.varint(-1)


def test_fields_and_map_entries() -> None:
    name = "views:déjà-vu"
    got = wire.string_field(1, name) + wire.head(8, 3) + b"abc"
    assert pb.FeatureValues.FromString(got) == pb.FeatureValues(name=name, raw_values=b"abc")
    entry = wire.string_int_entry(2, "user_stats", 300)
    assert pb.GetOnlineFeaturesResponse.FromString(entry).view_versions == {"user_stats": 300}
