"""IngestPredictionsRequest read from its wire bytes: prediction log records without a protobuf
message per tensor.

Through the protobuf runtime a record of 20 single-row feature tensors costs about 180 us to turn
into columns (each tensor's name, dtype, shape and bytes read as Python objects): 5,500 rows a
second. The records of one endpoint's model version are alike, though: the same fields in the same
order, the same tensors with the same shapes, differing only in the request id, the time and the
tensors' values. So each record's head (request id, the endpoint/model/version/revision/shadow
fields as bytes, latency, time) is read with a few byte operations, and the rest -- its tensors --
is compared as a whole with a template (the first such record, read by the protobuf runtime once):
records whose tensor bytes match it everywhere but in the values are stacked into a byte matrix,
and each tensor's values are a column slice of it, read by numpy. A record that does not fit (an
error message, string tensors, value lists, an unusual field order) is read by the runtime
(convert.record_groups). Both give the same RecordGroups (tests/monitoring/test_wire.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from strata.inference.v1 import inference_pb2 as ipb
from strata.monitoring.v1 import monitoring_pb2 as pb

from services.common.errors import UndecodableRequest
from services.common.limits import MAX_TIMESTAMP_SECONDS
from services.monitoring.types import RecordGroup

_REQUEST_ID, _LATENCY, _TIME = 0x0A, 0x39, 0x42  # PredictionRecord tags: field 1 LEN, 7 I64, 8 LEN
_HEAD = frozenset({0x12, 0x1A, 0x20, 0x28, 0x30})  # endpoint, model (LEN); version, revision, shadow (VARINT)
_INPUT, _OUTPUT = 0x4A, 0x52                         # fields 9 and 10, LEN
_RAW = 0x22                                          # Tensor.raw, field 4 LEN


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


@dataclass
class Request:
    """The fields of an IngestPredictionsRequest: record byte ranges, the Arrow bytes, outputs."""

    records: list[tuple[int, int]]
    arrow_ipc: bytes
    output_columns: list[str]


def split(data: bytes) -> Request:
    """The request's top-level fields; UndecodableRequest (INVALID_ARGUMENT) when the bytes are not
    an IngestPredictionsRequest."""
    records: list[tuple[int, int]] = []
    arrow, outputs = b"", []
    pos, end = 0, len(data)
    try:
        while pos < end:
            tag = data[pos]
            if tag < 0x80:  # (every field of the message: one byte)
                pos += 1
            else:
                tag, pos = _varint(data, pos)
            wire = tag & 7
            if wire == 2:
                n = data[pos]
                if n < 0x80:
                    pos += 1
                elif data[pos + 1] < 0x80:  # a record of up to 16 KiB
                    n, pos = (n & 0x7F) | data[pos + 1] << 7, pos + 2
                else:
                    n, pos = _varint(data, pos)
                stop = pos + n
                if stop > end:
                    raise ValueError("field cut short")
                field = tag >> 3
                if field == 1:
                    records.append((pos, stop))
                elif field == 2:
                    arrow = data[pos:stop]
                elif field == 3:
                    outputs.append(data[pos:stop].decode())
                pos = stop
            elif wire == 0:
                _, pos = _varint(data, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                raise ValueError("unknown wire type")
        if pos != end:
            raise ValueError("field cut short")
    except (ValueError, IndexError, UnicodeDecodeError):
        try:  # the runtime's own verdict, in its words
            pb.IngestPredictionsRequest.FromString(data)
            reason = "not a request this service reads"
        except DecodeError as e:
            reason = str(e).rsplit(": ", 1)[-1][:200]
        raise UndecodableRequest(f"the request does not decode as strata.monitoring.v1.IngestPredictionsRequest: "
                                 f"{reason}") from None
    return Request(records, arrow, outputs)


def _head(data: bytes, start: int, end: int, last: bytes) -> tuple[str, bytes, int, int] | None:
    """The record's fields before its tensors -- (request id, the endpoint..shadow fields as
    written, time in microseconds, where the tensors start) -- when they come in field order, as
    the inference service (and any protobuf runtime) writes them; else None (then the runtime reads
    the record). `last`: the previous record's head bytes, most often this one's too."""
    pos, rid = start, ""
    if data[pos] == _REQUEST_ID:
        n = data[pos + 1]
        p = pos + 2
        if n >= 0x80:
            n, p = _varint(data, pos + 1)
        rid = data[p:p + n].decode()
        pos = p + n
    head_at = pos
    if last and data.startswith(last, pos):
        pos += len(last)
    else:
        while pos < end and data[pos] in _HEAD:
            if data[pos] & 7 == 2:  # endpoint, model
                n, p = _varint(data, pos + 1)
                pos = p + n
            else:
                pos = _varint(data, pos + 1)[1]
    head = data[head_at:pos]
    if pos < end and data[pos] == _LATENCY:
        pos += 9
    time_us = 0
    if pos < end and data[pos] == _TIME:
        n, p = data[pos + 1], pos + 2
        seconds = nanos = 0
        stop = p + n
        while p < stop:
            if data[p] == 0x08:
                seconds, p = _varint(data, p + 1)
            elif data[p] == 0x10:
                nanos, p = _varint(data, p + 1)
            else:
                return None
        if seconds > MAX_TIMESTAMP_SECONDS or nanos > 999_999_999:  # (or negative): the runtime's path checks it
            return None
        time_us = seconds * 1_000_000 + nanos // 1000
        pos = stop
    if pos >= end or data[pos] not in (_INPUT, _OUTPUT):
        return None  # no tensors, or a field out of the usual order
    return rid, head, time_us, pos


def _fast_heads(data: bytes, spans: list[tuple[int, int]], last: bytes
                ) -> tuple[np.ndarray, list[str | None], np.ndarray, np.ndarray]:
    """`_head` for every record at once, in numpy, for records laid out as the inference service
    writes them: a request id of at most 127 bytes, then exactly the head bytes `last` (the first
    record's endpoint..shadow fields), the latency, a time whose seconds and nanos are both set,
    then tensors. Returns (which records fit, their request ids, times in microseconds, where their
    tensors start); the others go through `_head` one by one. (Reading each head in Python cost 8.5
    us a record: 60 % of ingesting a message of single-row records.)"""
    buf = np.frombuffer(data, np.uint8)
    size = len(buf)
    span = np.array(spans, np.int64).reshape(-1, 2)
    start, end = span[:, 0], span[:, 1]

    limit = np.minimum(end, size)

    def at(pos: np.ndarray, width: int = 1) -> np.ndarray:
        """Bytes at pos (.. pos + width - 1); 0 past the record's end (then a check below fails)."""
        if width == 1:
            return np.where(pos < limit, buf[np.minimum(pos, size - 1)], 0)
        idx = pos[:, None] + np.arange(width)
        return np.where(idx < limit[:, None], buf[np.minimum(idx, size - 1)], 0)

    def varint(pos: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(value, the position after it, ok) of a varint of at most `width` bytes at pos."""
        b = at(pos, width).astype(np.uint64)
        last_byte = b < 0x80
        ok = last_byte.any(axis=1)
        n = np.argmax(last_byte, axis=1)  # index of the last byte
        keep = np.arange(width) <= n[:, None]
        value = (((b & 0x7F) << (np.arange(width, dtype=np.uint64) * np.uint64(7))) * keep).sum(axis=1)
        return value.astype(np.int64), pos + n + 1, ok

    ok = (at(start) == _REQUEST_ID) & (at(start + 1) < 0x80)
    rid_at = start + 2
    pos = rid_at + at(start + 1).astype(np.int64)
    if last:
        ok &= (at(pos, len(last)) == np.frombuffer(last, np.uint8)).all(axis=1)
    pos = pos + len(last)
    ok &= at(pos) == _LATENCY
    pos = pos + 9
    ok &= (at(pos) == _TIME) & (at(pos + 2) == 0x08)
    time_end = pos + 2 + at(pos + 1).astype(np.int64)
    seconds, pos, fits = varint(pos + 3, 6)
    ok &= fits & (at(pos) == 0x10)
    nanos, pos, fits = varint(pos + 1, 5)
    ok &= fits & (pos == time_end) & (seconds <= MAX_TIMESTAMP_SECONDS) & (nanos <= 999_999_999)
    tensors = at(time_end)
    ok &= (time_end < end) & ((tensors == _INPUT) | (tensors == _OUTPUT))
    rids: list[str | None] = [None] * len(spans)
    for i in np.flatnonzero(ok).tolist():
        try:
            rids[i] = data[rid_at[i]:rid_at[i] + (data[start[i] + 1])].decode()
        except UnicodeDecodeError:
            ok[i] = False
    return ok, rids, seconds * 1_000_000 + nanos // 1000, time_end


@dataclass
class _Template:
    """A record's tensor bytes as the pattern of a group: where each tensor's values lie."""

    inputs: list[tuple[str, np.dtype, tuple[int, ...], int, int]]   # name, dtype, trailing shape, offset, bytes
    outputs: list[tuple[str, np.dtype, tuple[int, ...], int, int]]
    rows: int
    fixed: np.ndarray   # positions that are not values (they must equal the template's bytes)
    pattern: np.ndarray


def _template(section: bytes, numpy_of: dict[int, np.dtype]) -> _Template | None:
    inputs, outputs, values, rows = [], [], [], None
    pos = 0
    while pos < len(section):
        tag = section[pos]
        if tag not in (_INPUT, _OUTPUT):
            return None
        n, p = _varint(section, pos + 1)
        body = section[p:p + n]
        t = ipb.Tensor.FromString(body)
        dtype = numpy_of.get(t.dtype)
        if dtype is None or not t.raw or not t.shape or t.float_values or t.int_values or t.bool_values \
                or t.string_values:
            return None
        tail = tuple(t.shape[1:])
        if rows is None:
            rows = t.shape[0]
        if t.shape[0] != rows or len(t.raw) != rows * int(np.prod(tail, dtype=np.int64)) * dtype.itemsize:
            return None
        # The raw field is the tensor's last (Encoder order: name, dtype, shape, raw).
        q = 0
        while q < len(body):
            ftag = body[q]
            if ftag == _RAW:
                size, r = _varint(body, q + 1)
                if r + size != len(body):
                    return None
                break
            if ftag & 7 == 2:
                size, r = _varint(body, q + 1)
                q = r + size
            elif ftag & 7 == 0:
                q = _varint(body, q + 1)[1]
            else:
                return None
        else:
            return None
        offset = p + r
        values.append((offset, len(t.raw)))
        (inputs if tag == _INPUT else outputs).append((t.name, dtype, tail, offset, len(t.raw)))
        pos = p + n
    if rows is None or rows < 1:
        return None
    pattern = np.frombuffer(section, np.uint8)
    mask = np.ones(len(section), bool)
    for offset, size in values:
        mask[offset:offset + size] = False
    return _Template(inputs, outputs, rows, np.flatnonzero(mask), pattern)


def record_groups(data: bytes, spans: list[tuple[int, int]], numpy_of: dict[int, np.dtype]
                  ) -> tuple[list[RecordGroup], list[int]]:
    """The records that fit a template, as RecordGroups, and the positions of the others (for
    convert.record_groups)."""
    if not spans:
        return [], []
    try:
        first = _head(data, spans[0][0], spans[0][1], b"")
    except (IndexError, ValueError, UnicodeDecodeError):
        first = None
    common = first[1] if first is not None else b""
    fast, rids, times, starts = _fast_heads(data, spans, common)
    ends = np.array([e for _, e in spans], np.int64)
    # (head bytes, tensor bytes' length) -> member positions; the fast ones grouped in numpy
    by_key: dict[tuple[bytes, int], list[int]] = {}
    lengths = ends - starts
    for length in np.unique(lengths[fast]).tolist():
        by_key[(common, length)] = np.flatnonzero(fast & (lengths == length)).tolist()
    slow: list[int] = []
    last = b""
    for i in np.flatnonzero(~fast).tolist():  # the others, read one by one
        start, end = spans[i]
        try:
            h = _head(data, start, end, last)
        except (IndexError, ValueError, UnicodeDecodeError):
            h = None
        if h is None:
            slow.append(i)
            continue
        rids[i], last, times[i], starts[i] = h
        by_key.setdefault((last, end - h[3]), []).append(i)
    groups = []
    for (head, length), positions in sorted(by_key.items(), key=lambda kv: kv[1][0]):
        members = np.array(sorted(positions), np.int64)
        begin = int(starts[members[0]])
        try:
            template = _template(data[begin:begin + length], numpy_of)
        except (IndexError, ValueError, DecodeError):  # not tensors: the runtime says what is wrong
            template = None
        if template is None:
            slow += members.tolist()
            continue
        # (slices joined: cheaper than a numpy gather of the same bytes)
        matrix = np.frombuffer(b"".join([data[a:a + length] for a in starts[members].tolist()]),
                               np.uint8).reshape(len(members), length)
        fits = (matrix[:, template.fixed] == template.pattern[template.fixed]).all(axis=1)
        if not fits.all():
            slow += members[~fits].tolist()
            members, matrix = members[fits], matrix[fits]
        if not len(members):
            continue
        try:
            rec = ipb.PredictionRecord.FromString(head)
        except DecodeError:  # e.g. a name that is not UTF-8: the runtime's path names the problem
            slow += members.tolist()
            continue
        n = len(members)
        total = n * template.rows

        def column(name: str, dtype: np.dtype, tail: tuple[int, ...], offset: int, size: int,
                   matrix: np.ndarray = matrix, total: int = total) -> tuple[str, np.ndarray]:
            values = np.ascontiguousarray(matrix[:, offset:offset + size]).view(dtype)
            return name, values.reshape((total, *tail))

        positions = members.tolist()
        groups.append(RecordGroup(
            rec.endpoint, rec.model, rec.version, rec.shadow, [rids[i] for i in positions],  # type: ignore[misc]
            np.full(n, template.rows, np.int64), times[members].astype(np.int64), [""] * n,
            [column(*t) for t in template.inputs], [column(*t) for t in template.outputs], positions))
    return groups, sorted(slow)
