"""Pushed rows appended to a view's offline source (one Parquet file per push), so that a
training set built later sees exactly what serving saw. Only for sources that name a directory
or a `dir/*.parquet` glob (local or on S3, see files.py); the file appears under its final name
only when complete, so a concurrent reader never sees half a file."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import numpy as np
import pyarrow as pa
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as pb

from services.features.definitions import ViewDef
from services.features.files import OfflineFiles
from services.features.online import FLOATS, INTS

log = logging.getLogger("strata.features.offline")
_DT = types_pb2.DataType
_ARROW = {_DT.DATA_TYPE_FLOAT32: pa.float32(), _DT.DATA_TYPE_FLOAT64: pa.float64(), _DT.DATA_TYPE_INT32: pa.int32(),
          _DT.DATA_TYPE_INT64: pa.int64(), _DT.DATA_TYPE_BOOL: pa.bool_(), _DT.DATA_TYPE_STRING: pa.string()}


def make_appender(files: OfflineFiles) -> Callable[..., None]:
    def append(view: ViewDef, entities: dict[str, pb.EntityColumn], event_us: np.ndarray, columns: dict,
               nulls: dict) -> None:
        spec = view.spec
        directory = files.append_dir(spec.source.path) if spec.source.path and spec.source.timestamp_field \
            else None
        if directory is None:
            return
        data: dict[str, pa.Array] = {}
        for e in view.entities:
            col = entities[e.join_key]
            data[e.join_key] = (pa.array(list(col.int64_values), pa.int64()) if e.value_type == pb.VALUE_TYPE_INT64
                                else pa.array(list(col.string_values), pa.string()))
        for f in spec.features:
            values = columns[f.name]
            if f.dtype in FLOATS | INTS or f.dtype == _DT.DATA_TYPE_BOOL:
                values = values.tolist()
            data[f.name] = pa.array(values, _ARROW[f.dtype], mask=np.asarray(nulls[f.name]))
        data[spec.source.timestamp_field] = pa.array(event_us, pa.timestamp("us", tz="UTC"))
        if spec.source.created_timestamp_field:
            now = int(time.time() * 1e6)
            data[spec.source.created_timestamp_field] = pa.array([now] * len(event_us), pa.timestamp("us", tz="UTC"))
        files.add_file(directory, f"push-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet", pa.table(data))
    return append
