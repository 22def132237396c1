"""Hypothesis strategies built from protobuf message descriptors, and hand-made malformed
encodings of a method's request (what the Python API cannot produce: invalid UTF-8, out-of-range
varints, corrupt lengths, recursion bombs).

`Builder(...).message(desc)` draws a message of that type: each field present or not, scalars
with their boundary values (ints of the field's width at the edges, NaN and infinities, unknown
enum numbers, empty, huge and odd strings and bytes), repeated fields as short lists, maps as
small dicts, nested messages to depth 2. Strings come from random text, from a pool of hostile
ones (`default_pool`: paths that try to leave a store stay inside the suite's sandbox), and from
the names of objects the caller seeded, so that some draws reach real objects; a "plausible"
builder prefers those names (and per-field hints) so the hostile values sit beside valid ones.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from tests.security.rpc import message_class

F = FieldDescriptor
MAX_DEPTH = 2  # nested messages: the request (0), its message fields (1), theirs (2)
HUGE = 100_000
#: The name every hostile path in the pool ends in: a file by this name anywhere was written
#: through a path that escaped (tests/security/test_fuzz.py looks for it).
CANARY = "strata-fuzz-escape"

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
_EDGES = [0, 1, -1, 2, 7, 100, 2**15, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32 - 1, 2**32,
          2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 1_700_000_000, 1_700_000_000_000_000]


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([v for v in _EDGES if lo <= v <= hi]), st.integers(lo, hi))


_INT_RANGES = {
    F.TYPE_INT32: INT32, F.TYPE_SINT32: INT32, F.TYPE_SFIXED32: INT32,
    F.TYPE_INT64: INT64, F.TYPE_SINT64: INT64, F.TYPE_SFIXED64: INT64,
    F.TYPE_UINT32: UINT32, F.TYPE_FIXED32: UINT32,
    F.TYPE_UINT64: UINT64, F.TYPE_FIXED64: UINT64,
}
_FLOAT_EDGES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 3.4e38, -1.0, 1e300, -1e300]


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = _FLOAT_EDGES if width == 64 else [
        v for v in _FLOAT_EDGES if not math.isfinite(v) or abs(v) < 3.5e38]
    return st.one_of(st.sampled_from(edges), st.floats(allow_nan=True, allow_infinity=True, width=width))


def default_pool(sandbox_file: Callable[[str], str], stores: Sequence[str] = ()) -> list[str]:
    """Odd strings: empty, huge (ASCII and multi-byte), control and bidi characters, injection
    shapes, and paths that try to leave a store, each ending in CANARY. Relative ones climb at
    most 6 `..` (the homes lie deeper in the sandbox), absolute ones name only the sandbox; a
    service that resolved a relative path against its working directory instead of its store
    would write near the repository root, where the fuzz test looks as well."""
    return [
        "", " ", "0", "-1", "a", "A", "a" * 63, "a" * 64, "b" * 257, "x" * HUGE, "é" * (HUGE // 2),
        "🙂" * 1000,
        "\x00", "a\x00b", "\n", "\t\r", "\u202eabc", "\ufeff", "ａｄｍｉｎ", "ℕ𝔞𝔪𝔢", "İ", "名前",
        "NaN", "Infinity", "-Infinity", "1e309", "null", "true", "{}", "[]", "%s%n%x", "{name}", "${x}",
        "' OR '1'='1", "\"; DROP TABLE audit_events; --", "<script>", "\\", "%", "_", "*", "**", "?", "[",
        "[!a]",
        ".", "..", "../" * 6 + f"{CANARY}.parquet", f"*/../../../../../../{CANARY}-glob.parquet",
        f"a/*/../../../../../{CANARY}-glob2.parquet", f"..%2f..%2f..%2f{CANARY}-pct.parquet",
        f"%2e%2e/%2e%2e/{CANARY}.bin", f"x/../../../../../../{CANARY}-dir/",
        f"\u2024\u2024/\u2024\u2024/{CANARY}-lookalike.parquet", f"file:{CANARY}-rel.parquet",
        sandbox_file(f"{CANARY}-abs.parquet"), f"file://{sandbox_file(CANARY + '-uri.parquet')}",
        sandbox_file("*.parquet"), "models/x/versions/1", "uploads/..", "featureViews/x:y",
        # <store>/*/../../../../x.parquet passed a check that looked only before the glob
        *(p for store in stores for p in (f"{store}/*/../../../../{CANARY}-store-glob.parquet",
                                          f"{store}/../../../{CANARY}-store-up.parquet",
                                          f"{store}/training-sets/../../../../{CANARY}-ts.parquet")),
    ]


def strings(pool: Sequence[str], names: Sequence[str] = (),
            plausible: bool = False) -> st.SearchStrategy[str]:
    """Random text, a string of the pool, or (as often; `plausible`: mostly) one of `names`: the
    objects the caller seeded, so that draws get past "not found" into the code behind it."""
    # Random text never carries a path separator or `~`: paths come from the pool only, so no
    # draw can name a place on the host outside the sandbox.
    text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\\~"), max_size=24)
    branches = [text, _one_of_values(list(pool))]
    if names:
        branches += [_one_of_values(list(names))] * (1 + 4 * plausible)
    return st.one_of(branches)


def _one_of_values(values: list) -> st.SearchStrategy:
    """sampled_from by index: the strategy's repr never spells out a 100 kB string."""
    return st.integers(0, len(values) - 1).map(lambda i: values[i])


_BYTES_POOL = [b"", b"\x00" * HUGE, b"\xff\xfe", b"PAR1", b"ARROW1\x00\x00", b"\x08\x96\x01",
               bytes(range(256))]


@dataclass
class Builder:
    """Strategies for messages of a pool's strings, cached per (type, depth)."""

    pool: Sequence[str]
    names: Sequence[str] = ()
    #: Strings mostly from `names`, so more requests reach real objects (the hostile values
    #: then sit in the other fields).
    plausible: bool = False
    #: Valid bytes values (an Arrow IPC entity table, ...) for bytes fields, as `names` for strings.
    blobs: Sequence[bytes] = ()
    #: Plausible builders only: values for fields of a given name (of any message), drawn most of
    #: the time (a map field's name: for its keys), e.g. {"model": ["mymodel"], "version": [1]}.
    hints: dict[str, Sequence[object]] = field(default_factory=dict)
    _cache: dict[tuple[str, int], st.SearchStrategy] = field(default_factory=dict)

    def _hinted(self, name: str, base: st.SearchStrategy | None) -> st.SearchStrategy | None:
        if not self.plausible or name not in self.hints or base is None:
            return base
        return st.one_of(*[_one_of_values(list(self.hints[name]))] * 3, base)

    def scalar(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy | None:
        if fd.type not in (F.TYPE_MESSAGE, F.TYPE_GROUP):
            return self._hinted(fd.name, self._scalar(fd, depth))
        return self._scalar(fd, depth)

    def _scalar(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy | None:
        t = fd.type
        if t in _INT_RANGES:
            return _ints(*_INT_RANGES[t])
        if t == F.TYPE_BOOL:
            return st.booleans()
        if t == F.TYPE_DOUBLE:
            return _floats(64)
        if t == F.TYPE_FLOAT:
            return _floats(32)
        if t == F.TYPE_STRING:
            return strings(self.pool, self.names, self.plausible)
        if t == F.TYPE_BYTES:
            branches = [st.binary(max_size=64), _one_of_values(_BYTES_POOL)]
            if self.blobs:
                branches += [_one_of_values(list(self.blobs))] * (1 + 2 * self.plausible)
            return st.one_of(branches)
        if t == F.TYPE_ENUM:
            known = [v.number for v in fd.enum_type.values]
            return st.sampled_from(known + [-1, 99, 2**31 - 1])  # unknown numbers too
        if t in (F.TYPE_MESSAGE, F.TYPE_GROUP):
            return None if depth + 1 > MAX_DEPTH else self.message(fd.message_type, depth + 1)
        raise AssertionError(f"field type {t} of {fd.full_name}")

    def value(self, fd: FieldDescriptor, depth: int) -> st.SearchStrategy | None:
        if _is_map(fd):
            key = self._hinted(fd.name, self.scalar(fd.message_type.fields_by_name["key"], depth))
            val = self.scalar(fd.message_type.fields_by_name["value"], depth)
            return None if key is None or val is None else st.dictionaries(key, val, max_size=3)
        one = self.scalar(fd, depth)
        if one is None:
            return None
        return st.lists(one, max_size=3) if _is_repeated(fd) else one

    def message(self, desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
        key = (desc.full_name, depth)
        if key not in self._cache:
            fields = {}
            for fd in desc.fields:
                s = self.value(fd, depth)
                if s is not None:
                    fields[fd.name] = s
            cls = message_class(desc)
            self._cache[key] = st.fixed_dictionaries({}, optional=fields).map(
                lambda v, cls=cls: _build(cls, v))
        return self._cache[key]


def _is_repeated(fd: FieldDescriptor) -> bool:
    rep = getattr(fd, "is_repeated", None)
    return bool(rep) if rep is not None else fd.label == F.LABEL_REPEATED


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.type == F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def _build(cls: type, values: dict) -> Message:
    msg = cls()
    for name, v in values.items():
        fd = cls.DESCRIPTOR.fields_by_name[name]
        try:
            _assign(msg, fd, v)
        except (ValueError, TypeError, OverflowError):  # the Python API refuses it (closed enum...)
            pass
    return msg


def _assign(msg: Message, fd: FieldDescriptor, v: object) -> None:
    target = getattr(msg, fd.name)
    if _is_map(fd):
        value_is_msg = fd.message_type.fields_by_name["value"].type == F.TYPE_MESSAGE
        for k, val in v.items():  # type: ignore[attr-defined]
            if value_is_msg:
                target[k].CopyFrom(val)
            else:
                target[k] = val
    elif _is_repeated(fd):
        if fd.type == F.TYPE_MESSAGE:
            for item in v:  # type: ignore[attr-defined]
                target.add().CopyFrom(item)
        else:
            target.extend(v)  # type: ignore[arg-type]
    elif fd.type == F.TYPE_MESSAGE:
        target.CopyFrom(v)  # type: ignore[arg-type]
    else:
        setattr(msg, fd.name, v)


# -- hand-made wire bytes --------------------------------------------------------------------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint((number << 3) | wire)


def ld(number: int, body: bytes) -> bytes:
    """A length-delimited field."""
    return tag(number, 2) + varint(len(body)) + body


_VARINT_TYPES = {F.TYPE_INT32, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_SINT32, F.TYPE_SINT64,
                 F.TYPE_BOOL, F.TYPE_ENUM}
BAD_UTF8 = b"\xff\xfe"


def malformed(desc: Descriptor) -> list[tuple[str, bytes]]:
    """Encodings of a `desc` request that the Python API cannot make: (label, bytes)."""
    rnd = random.Random(20240613)
    out: list[tuple[str, bytes]] = [
        ("bad tag byte", b"\xff"),
        ("field number 0", b"\x00\x00"),
        ("wire type 6", b"\x0e\x00"),
        ("wire type 7", b"\x0f\x00"),
        ("group start without end", b"\x0b"),
        ("group end without start", b"\x0c"),
        ("varint longer than 10 bytes", b"\x08" + b"\xff" * 11 + b"\x01"),
        ("length larger than the message", b"\x0a\xff\xff\xff\xff\x07abc"),
        ("length of 2^64-1", b"\x0a" + varint(2**64 - 1)),
        ("truncated fixed64", b"\x09\x01\x02"),
        ("random 1 KiB", rnd.randbytes(1024)),
        ("random 1 MiB", rnd.randbytes(1 << 20)),
    ]
    for label, path, fd in _fields(desc, depth=0):
        n = fd.number

        def wrap(body: bytes, path: tuple[int, ...] = path) -> bytes:
            for outer in reversed(path):
                body = ld(outer, body)
            return body

        if fd.type == F.TYPE_STRING:
            out.append((f"{label}: invalid UTF-8", wrap(ld(n, BAD_UTF8))))
            out.append((f"{label}: lone surrogate (CESU)", wrap(ld(n, b"\xed\xa0\x80"))))
            out.append((f"{label}: overlong NUL", wrap(ld(n, b"\xc0\x80"))))
        if fd.type in (F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_MESSAGE):
            out.append((f"{label}: length past the end", wrap(tag(n, 2) + varint(1 << 30) + b"x")))
        if fd.type == F.TYPE_MESSAGE:
            out.append((f"{label}: body is garbage", wrap(ld(n, b"\xff\xff\xff"))))
            if _is_map(fd):
                kfd = fd.message_type.fields_by_name["key"]
                if kfd.type == F.TYPE_STRING:
                    out.append((f"{label}: map key invalid UTF-8", wrap(ld(n, ld(1, BAD_UTF8)))))
        if fd.type in _VARINT_TYPES:
            for v in (2**31, 2**63 - 1, 2**64 - 1):
                out.append((f"{label}: varint {v}", wrap(tag(n, 0) + varint(v))))
            out.append((f"{label}: as a length-delimited field", wrap(ld(n, b"abc"))))
        if fd.type in (F.TYPE_DOUBLE, F.TYPE_FIXED64, F.TYPE_SFIXED64):
            out.append((f"{label}: NaN payload bits", wrap(tag(n, 1) + b"\x01\x00\x00\x00\x00\x00\xf8\x7f")))
        if _is_repeated(fd) and fd.type in _VARINT_TYPES | {F.TYPE_DOUBLE, F.TYPE_FLOAT}:
            out.append((f"{label}: packed with a truncated element", wrap(ld(n, b"\x01\x80"))))
            out.append((f"{label}: 1e6 packed zeros", wrap(ld(n, b"\x00" * 1_000_000))))
    bomb = recursion_bomb(desc)
    if bomb is not None:
        out.append(bomb)
    return out


def _fields(desc: Descriptor, depth: int, prefix: str = "", path: tuple[int, ...] = ()):  # noqa: ANN202
    """(label, enclosing field numbers, field) for the fields of desc and of its message fields
    down to MAX_DEPTH."""
    for fd in desc.fields:
        label = f"{prefix}{fd.name}"
        yield label, path, fd
        if fd.type == F.TYPE_MESSAGE and not _is_map(fd) and depth + 1 <= MAX_DEPTH:
            yield from _fields(fd.message_type, depth + 1, f"{label}.", (*path, fd.number))


def recursion_bomb(desc: Descriptor, levels: int = 200) -> tuple[str, bytes] | None:
    """A message nested `levels` deep through a recursive type reachable from desc
    (google.protobuf.Struct in a request, for instance), or None when there is none."""
    def find(d: Descriptor, path: list[tuple[FieldDescriptor, Descriptor]],  # noqa: ANN202
             seen: dict[str, int]):
        for fd in d.fields:
            if fd.type != F.TYPE_MESSAGE:
                continue
            sub = fd.message_type
            if _is_map(fd):
                vfd = sub.fields_by_name["value"]
                if vfd.type != F.TYPE_MESSAGE:
                    continue
                hop = [(fd, sub), (vfd, vfd.message_type)]
                nxt = vfd.message_type
            else:
                hop = [(fd, sub)]
                nxt = sub
            if nxt.full_name in seen:
                start = seen[nxt.full_name]
                return path + hop, start
            if len(path) > 8:
                continue
            seen2 = {**seen, nxt.full_name: len(path) + len(hop)}
            found = find(nxt, path + hop, seen2)
            if found:
                return found
        return None

    found = find(desc, [], {desc.full_name: 0})
    if found is None:
        return None
    path, start = found
    numbers = [fd.number for fd, _ in path]
    prefix, cycle = numbers[:start], numbers[start:]
    chain = prefix + cycle * (levels // max(1, len(cycle)))
    body = b""
    for n in reversed(chain):
        body = ld(n, body)
    names = ".".join(fd.name for fd, _ in path)
    return f"nested {len(chain)} deep through {names}", body


# -- describing an input for a report --------------------------------------------------------

def describe(payload: bytes, message: Message | None) -> str:
    if message is not None:
        text = text_format.MessageToString(message, as_one_line=True, print_unknown_fields=True)
        text = re.sub(r"(.)\1{40,}", lambda m: f"{m.group(1)}<x{len(m.group(0))}>", text)
        text = re.sub(r"((?:\\\d{3}|\\x[0-9a-f]{2}){40,})",
                      lambda m: f"<{len(m.group(0))} escaped bytes>", text)
        return text[:800] + ("..." if len(text) > 800 else "")
    return payload[:200].hex() + (f"... ({len(payload)} bytes)" if len(payload) > 200 else "")


# -- boundary sweep on a plausible request ---------------------------------------------------

_SWEEP_INTS = [-1, 0, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**32, 2**53 + 1, 2**63 - 1, -(2**63),
               2**64 - 1]
_SWEEP_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1e300]


def base_message(desc: Descriptor, hints: dict[str, Sequence[object]], depth: int = 0) -> Message:
    """A request that names seeded objects: each string or bytes field with a hint gets the
    hint's first value, in nested messages too (a repeated one gets one element), a map with a
    hint gets that key; nothing else is set."""
    msg = message_class(desc)()
    for fd in desc.fields:
        try:
            if _is_map(fd):
                if fd.name in hints and fd.message_type.fields_by_name["key"].type == F.TYPE_STRING:
                    vfd = fd.message_type.fields_by_name["value"]
                    key = str(hints[fd.name][0])
                    if vfd.type == F.TYPE_MESSAGE:
                        getattr(msg, fd.name)[key].CopyFrom(base_message(vfd.message_type, hints, depth + 1))
            elif fd.type in (F.TYPE_STRING, F.TYPE_BYTES) and fd.name in hints:
                value = hints[fd.name][0]
                if _is_repeated(fd):
                    getattr(msg, fd.name).append(value)
                else:
                    setattr(msg, fd.name, value)
            elif fd.type == F.TYPE_MESSAGE and depth < MAX_DEPTH:
                sub = base_message(fd.message_type, hints, depth + 1)
                if sub.ByteSize():
                    if _is_repeated(fd):
                        getattr(msg, fd.name).add().CopyFrom(sub)
                    else:
                        getattr(msg, fd.name).CopyFrom(sub)
        except (ValueError, TypeError):  # a hint of the wrong type for this field
            pass
    return msg


def boundary_cases(desc: Descriptor, base: Message) -> list[tuple[str, Message]]:
    """`base` with one number at an edge: every integer, float and enum field (nested to depth
    2; a repeated one as a one-element list) at each boundary its type can hold (-1, 0, 2^31-1,
    2^31, 2^63-1, ...; NaN, infinities, -0.0; unknown enum numbers)."""
    out: list[tuple[str, Message]] = []
    for label, path, fd in _fields(desc, depth=0):
        if fd.type in _INT_RANGES:
            lo, hi = _INT_RANGES[fd.type]
            values: list[object] = [v for v in _SWEEP_INTS if lo <= v <= hi]
        elif fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            values = list(_SWEEP_FLOATS)
        elif fd.type == F.TYPE_ENUM:
            values = [-1, 99, 2**31 - 1]
        else:
            continue
        if _is_map(fd):
            continue
        for v in values:
            msg = type(base)()
            msg.CopyFrom(base)
            target = msg
            try:
                for number in path:
                    outer = next(f for f in target.DESCRIPTOR.fields if f.number == number)
                    if _is_map(outer):
                        raise TypeError("inside a map")
                    if _is_repeated(outer):
                        items = getattr(target, outer.name)
                        target = items[0] if len(items) else items.add()
                    else:
                        target = getattr(target, outer.name)
                if _is_repeated(fd):
                    getattr(target, fd.name)[:] = [v]
                else:
                    setattr(target, fd.name, v)
            except (ValueError, TypeError):
                continue
            out.append((f"{label} = {v!r}", msg))
    return out
