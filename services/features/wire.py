"""The Protocol Buffers wire format, for the one response the serving path writes itself: the
raw GetOnlineFeaturesResponse (`encode_online`). The transport side: it knows field numbers.

A raw GetOnlineFeaturesResponse is mostly byte blocks the online store already holds in wire
form (little-endian values, one status byte per row, event times), so it is written as a list of
byte strings joined once, instead of building protobuf objects that are serialized right after:
in the serving process that took ~215 us of a ~600 us 100 x 20 call (docs/performance.md).
Tests parse every encoded response with the generated classes and compare it with the typed one.
"""

from __future__ import annotations

import weakref
from itertools import chain

import numpy as np

from services.features.online_serving import PRESENT, CachedView, OnlineRows
from services.features.online_serving import statuses as _statuses
from services.features.types import DataType

# Wire types (https://protobuf.dev/programming-guides/encoding/).
VARINT = 0
LEN = 2

_SMALL: dict[int, bytes] = {}  # the varints of 0..16383 (one or two bytes), made on first use


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative int (lengths, field numbers, versions)."""
    small = _SMALL.get(n)
    if small is not None:
        return small
    if n < 0:
        raise ValueError(f"varint of a negative number: {n}")
    out, rest = bytearray(), n
    while rest >= 0x80:
        out.append((rest & 0x7F) | 0x80)
        rest >>= 7
    out.append(rest)
    data = bytes(out)
    if n < 1 << 14:
        _SMALL[n] = data
    return data


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def head(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field; its `length` bytes follow."""
    return tag(field, LEN) + varint(length)


def string_field(field: int, value: str) -> bytes:
    data = value.encode()
    return head(field, len(data)) + data


def string_int_entry(field: int, key: str, value: int) -> bytes:
    """One entry of a `map<string, int64>` field (a message: key = 1, value = 2)."""
    entry = string_field(1, key) + tag(2, VARINT) + varint(value)
    return head(field, len(entry)) + entry


# -- the raw online answer -----------------------------------------------------------------------
_BOOL = int(DataType.BOOL)
_PRESENT_BYTE = bytes([PRESENT])
_FEATURES_TAG = tag(1, LEN)         # GetOnlineFeaturesResponse.features
_STRING_TAG = tag(5, LEN)           # FeatureValues.string_values
# Per cached view version: feature name -> its encoded FeatureValues.name field ("{view}:{feature}"),
# and its view_versions entry. Kept while the cache holds the entry, made again for a new one.
_VIEW_FIELDS: weakref.WeakKeyDictionary[CachedView, tuple[dict[str, bytes], bytes]] = weakref.WeakKeyDictionary()


def _view_fields(cached: CachedView) -> tuple[dict[str, bytes], bytes]:
    fields = _VIEW_FIELDS.get(cached)
    if fields is None:
        spec = cached.view.spec
        fields = _VIEW_FIELDS[cached] = ({f.name: string_field(1, f"{spec.name}:{f.name}") for f in spec.features},
                                         string_int_entry(2, spec.name, spec.version))  # view_versions[name] = version
    return fields


def _string_value(data: bytes) -> tuple[bytes, bytes, bytes]:
    return _STRING_TAG, varint(len(data)), data


def encode_online(read: OnlineRows) -> bytes:
    """The serialized GetOnlineFeaturesResponse of a raw read, written straight from the row
    bytes (the module docstring says why): what the protobuf serializer writes (fields in number
    order, empty ones left out). A feature's name is the reference it was asked by, always
    "{view}:{feature}", so its encoded field is kept with the view."""
    now_us = read.now_us
    columns: list[tuple] = [()] * len(read.features)  # the parts of each FeatureValues, by position
    versions = []
    for step, view_blobs in zip(read.steps, read.blobs, strict=True):
        cached = step.cached
        spec, codec = cached.view.spec, cached.codec
        name_fields, version_entry = _view_fields(cached)
        versions.append(version_entry)
        rows = len(step.keys)
        statuses: np.ndarray | None = None  # None: every value PRESENT
        strings: dict[str, list[str]] = {}
        fast = codec.all_fixed(view_blobs)
        if fast is not None and not fast[3] and not (spec.ttl_seconds and
                                                     fast[2] < now_us - spec.ttl_seconds * 1_000_000):
            fixed, events = fast[0], fast[1]
        else:
            decoded = codec.decode(view_blobs)
            statuses = _statuses(spec, decoded, now_us)
            fixed, events, strings = decoded.fixed.tobytes(), decoded.event_us.astype("<i8").tobytes(), \
                decoded.strings
        fixed_raw, word = memoryview(fixed), 8 * rows  # a fixed feature's column is a slice
        status_raw = None if statuses is None else memoryview(statuses.tobytes())
        # Heads and the status/event parts are the same for every feature of the view.
        values_head, status_head, event_head = head(8, word), head(9, rows), head(10, word)
        tail = (status_head, _PRESENT_BYTE * rows, event_head, events) if rows else ()
        tail_len = len(status_head) + rows + len(event_head) + word if rows else 0
        fixed_len = len(values_head) + word + tail_len if rows else 0
        for i, feature in step.wanted:
            name = name_fields[feature]
            j = codec.fixed_index.get(feature)
            if rows and j is not None and cached.types[feature] != _BOOL and status_raw is None:  # the usual case
                columns[i] = (_FEATURES_TAG, varint(len(name) + fixed_len), name, values_head,
                              fixed_raw[j * word:(j + 1) * word], *tail)
                continue
            if j is None:  # STRING: repeated string_values = 5, one field per row
                values = [part for text in strings.get(feature, ()) for part in _string_value(text.encode())]
            elif not rows:
                values = []
            elif cached.types[feature] == _BOOL:  # raw_values as one uint8 per row
                values = [head(8, rows), np.frombuffer(fixed_raw, "<u8", rows, j * word).astype(np.uint8)
                          .tobytes()]
            else:
                values = [values_head, fixed_raw[j * word:(j + 1) * word]]
            if status_raw is not None and rows:
                k = codec.null_index[feature]
                values += (status_head, status_raw[k * rows:(k + 1) * rows], event_head, events)
            else:
                values += tail
            columns[i] = (_FEATURES_TAG, varint(len(name) + sum(map(len, values))), name, *values)
    return b"".join(chain.from_iterable(columns)) + b"".join(versions)
