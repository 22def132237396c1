"""The Protocol Buffers wire format, for the one response the serving path writes itself.

A raw GetOnlineFeaturesResponse is mostly byte blocks the online store already holds in wire
form (little-endian values, one status byte per row, event times), so it is written as a list of
byte strings joined once, instead of building protobuf objects that are serialized right after:
in the serving process that took ~215 us of a ~600 us 100 x 20 call (docs/performance.md).
Tests parse every encoded response with the generated classes and compare it with the typed one.
"""

from __future__ import annotations

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
