"""Converters between plain Python values and protobuf well-known types, for servicers (the
transport side). Domain modules do not import this: they work with plain values only."""

from __future__ import annotations

from datetime import datetime
from typing import overload

import numpy as np
from google.protobuf import timestamp_pb2
from strata.common.v1 import types_pb2

from services.common.timeutil import as_utc

_DT = types_pb2.DataType
#: strata.common.v1.DataType -> numpy, the numeric and boolean types (the tensors the inference
#: service serves and the monitoring service stores).
NUMERIC_DATA_TYPES: dict[int, np.dtype] = {
    _DT.DATA_TYPE_FLOAT32: np.dtype(np.float32), _DT.DATA_TYPE_FLOAT64: np.dtype(np.float64),
    _DT.DATA_TYPE_FLOAT16: np.dtype(np.float16), _DT.DATA_TYPE_INT8: np.dtype(np.int8),
    _DT.DATA_TYPE_INT16: np.dtype(np.int16), _DT.DATA_TYPE_INT32: np.dtype(np.int32),
    _DT.DATA_TYPE_INT64: np.dtype(np.int64), _DT.DATA_TYPE_UINT8: np.dtype(np.uint8),
    _DT.DATA_TYPE_UINT16: np.dtype(np.uint16), _DT.DATA_TYPE_UINT32: np.dtype(np.uint32),
    _DT.DATA_TYPE_UINT64: np.dtype(np.uint64), _DT.DATA_TYPE_BOOL: np.dtype(np.bool_),
}


@overload
def timestamp_pb(t: datetime) -> timestamp_pb2.Timestamp: ...
@overload
def timestamp_pb(t: None) -> None: ...
def timestamp_pb(t: datetime | None) -> timestamp_pb2.Timestamp | None:
    """`t` as a Timestamp. A naive datetime is UTC (as SQLite returns every stored time; see
    services/common/timeutil.py); None gives None, which leaves the message field unset."""
    if t is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(as_utc(t))
    return out
