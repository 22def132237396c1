"""Online reads and pushes: requests in columnar form, numpy in between, no per-value Python
for numeric features.

Reads: feature references are grouped by view; each view is read with one call to the online
store for all entity rows (one MGET in Redis); statuses say PRESENT, NOT_FOUND, EXPIRED (older
than the view's ttl) or NULL_VALUE -- a missing value is never a silent zero.
Pushes: the whole batch is checked (types, entity keys, validation rules) before anything is
written; the first problem is reported with its row and feature, and nothing is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as pb

from services.common.errors import InvalidArgument
from services.features.definitions import Definitions, ViewDef
from services.features.online import FLOATS, INTS, OnlineStore, RowCodec

_DT = types_pb2.DataType
KEY_SEP = "\x1f"
# Enum values as plain ints (an attribute lookup on the generated enum costs a Python call).
PRESENT, NOT_FOUND, EXPIRED, NULL_VALUE = (int(pb.FEATURE_STATUS_PRESENT), int(pb.FEATURE_STATUS_NOT_FOUND),
                                           int(pb.FEATURE_STATUS_EXPIRED), int(pb.FEATURE_STATUS_NULL_VALUE))


@dataclass
class _Cached:
    view: ViewDef
    codec: RowCodec
    loaded: float


class ViewCache:
    """Current view definitions, re-read at most every `max_age` seconds (definitions change
    rarely; a process that applied a change drops its entry at once)."""

    def __init__(self, definitions: Definitions, max_age: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.definitions = definitions
        self.max_age = max_age
        self._clock = clock
        self._views: dict[str, _Cached] = {}

    def get(self, name: str) -> _Cached:
        c = self._views.get(name)
        if c is None or self._clock() - c.loaded > self.max_age:
            view = self.definitions.get_view(name)
            if c is not None and (c.view.spec.version, c.view.spec.update_time) == \
                    (view.spec.version, view.spec.update_time):
                c.loaded = self._clock()
                return c
            c = self._views[name] = _Cached(view, RowCodec(view.spec), self._clock())
        return c

    def drop(self, name: str) -> None:
        self._views.pop(name, None)


def entity_keys(view: ViewDef, columns: dict[str, pb.EntityColumn], field: str = "entities") -> list[str]:
    """One string key per row: the join key values, typed as the entities declare."""
    cols, rows = [], -1
    for e in view.entities:
        col = columns.get(e.join_key)
        if col is None:
            raise InvalidArgument(f"{field}[{e.join_key}]", f"view '{view.spec.name}' needs join key "
                                  f"'{e.join_key}' (entity {e.name})")
        if e.value_type == pb.VALUE_TYPE_INT64:
            if col.string_values:
                raise InvalidArgument(f"{field}[{e.join_key}]", f"entity {e.name} is keyed by INT64; "
                                      "got string values")
            values = [str(v) for v in col.int64_values]
        else:
            if col.int64_values:
                raise InvalidArgument(f"{field}[{e.join_key}]", f"entity {e.name} is keyed by STRING; "
                                      "got int64 values")
            values = list(col.string_values)
        if rows not in (-1, len(values)):
            raise InvalidArgument(f"{field}[{e.join_key}]", f"{len(values)} keys; other join keys have {rows}")
        rows = len(values)
        cols.append(values)
    if len(cols) == 1:
        return cols[0]
    return [KEY_SEP.join(parts) for parts in zip(*cols, strict=True)]


def parse_refs(refs: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, ref in enumerate(refs):
        view, sep, feature = ref.partition(":")
        if not sep or not view or not feature:
            raise InvalidArgument(f"features[{i}]", f"'{ref}' is not a feature reference (view:feature)")
        out.append((view, feature))
    return out


class FeatureServer:
    def __init__(self, views: ViewCache, store: OnlineStore, clock: Callable[[], float] = time.time,
                 offline_append: Callable[[ViewDef, dict[str, pb.EntityColumn], np.ndarray, dict, dict], None]
                 | None = None) -> None:
        self.views = views
        self.store = store
        self._clock = clock
        # Pushed rows also go to the view's offline source, so training later sees what serving saw.
        self.offline_append = offline_append

    # -- reads -----------------------------------------------------------------------------------
    def get_online(self, request: pb.GetOnlineFeaturesRequest) -> pb.GetOnlineFeaturesResponse:
        if not request.features:
            raise InvalidArgument("features", "no features requested")
        refs = parse_refs(list(request.features))
        by_view: dict[str, list[tuple[int, str]]] = {}
        for i, (view, feature) in enumerate(refs):
            by_view.setdefault(view, []).append((i, feature))
        columns: list[pb.FeatureValues | None] = [None] * len(refs)
        resp = pb.GetOnlineFeaturesResponse()
        now_us = int(self._clock() * 1e6)
        plan = []
        for view_name, wanted in by_view.items():
            cached = self.views.get(view_name)
            types = {f.name: f.dtype for f in cached.view.spec.features}
            for i, feature in wanted:
                if feature not in types:
                    raise InvalidArgument(f"features[{i}]", f"view '{view_name}' (version {cached.view.spec.version}) "
                                          f"has no feature '{feature}'")
            plan.append((cached, types, wanted, entity_keys(cached.view, request.entities)))
        # Every view's rows in one round trip to the store.
        blobs = self.store.read_many([(c.view.spec.name, c.view.spec.version, keys) for c, _, _, keys in plan])
        for (cached, types, wanted, keys), view_blobs in zip(plan, blobs, strict=True):
            spec = cached.view.spec
            decoded = cached.codec.decode(view_blobs)
            expired = np.zeros(len(keys), dtype=bool)
            if spec.ttl_seconds:
                expired = decoded.found & (decoded.event_us < now_us - spec.ttl_seconds * 1_000_000)
            resp.view_versions[spec.name] = spec.version
            base = np.where(decoded.found, np.where(expired, EXPIRED, PRESENT), NOT_FOUND).astype(np.uint8)
            present = base == PRESENT
            if request.raw:
                event_raw = decoded.event_us.astype("<i8").tobytes()
            else:
                # Lists, not numpy arrays: protobuf's extend converts a list in C, an array element by element.
                event_us = decoded.event_us.tolist()
            for i, feature in wanted:
                col = pb.FeatureValues(name=request.features[i])
                status = np.where(present & decoded.nulls[feature], np.uint8(NULL_VALUE), base)
                values = decoded.values[feature]
                dtype = types[feature]
                if request.raw:
                    col.raw_statuses = status.tobytes()
                    col.raw_event_timestamps_us = event_raw
                    if dtype == _DT.DATA_TYPE_STRING:
                        col.string_values.extend(values)
                    else:
                        col.raw_values = np.asarray(values, dtype="<f8" if dtype in FLOATS else "<i8" if dtype in INTS
                                                    else np.uint8).tobytes()
                    columns[i] = col
                    continue
                if isinstance(values, np.ndarray):
                    values = values.tolist()
                if dtype in FLOATS:
                    col.double_values.extend(values)
                elif dtype in INTS:
                    col.int64_values.extend(values)
                elif dtype == _DT.DATA_TYPE_BOOL:
                    col.bool_values.extend(values)
                else:
                    col.string_values.extend(values)
                col.statuses.extend(status.tolist())
                col.event_timestamps_us.extend(event_us)
                columns[i] = col
        resp.features.extend(columns)  # type: ignore[arg-type]
        return resp

    # -- pushes ----------------------------------------------------------------------------------
    def push(self, request: pb.PushFeaturesRequest) -> pb.PushFeaturesResponse:
        cached = self.views.get(request.view)
        spec, codec = cached.view.spec, cached.codec
        keys = entity_keys(cached.view, request.entities)
        rows = len(keys)
        if not rows:
            raise InvalidArgument("entities", "no rows")
        ts = np.asarray(request.event_timestamps_us, dtype=np.int64)
        if len(ts) != rows:
            raise InvalidArgument("event_timestamps_us", f"{len(ts)} timestamps for {rows} rows")
        if rows and ts.min() <= 0:
            raise InvalidArgument("event_timestamps_us", f"rows[{int(np.argmin(ts))}]: the timestamp must be "
                                  "positive microseconds since the epoch")
        given = {c.name: c for c in request.features}
        columns, nulls = {}, {}
        for f in spec.features:
            col = given.pop(f.name, None)
            if col is None:
                raise InvalidArgument(f"features[{f.name}]", f"view '{spec.name}' needs feature '{f.name}' in "
                                      "every push")
            columns[f.name], nulls[f.name] = _column(f, col, rows)
            validate_rules(f, columns[f.name], nulls[f.name])
        if given:
            name = sorted(given)[0]
            raise InvalidArgument(f"features[{name}]", f"view '{spec.name}' (version {spec.version}) has no "
                                  f"feature '{name}'")
        if self.offline_append is not None:  # first: the durable record; a failure writes nothing online
            self.offline_append(cached.view, dict(request.entities), ts, columns, nulls)
        self.store.write(spec.name, spec.version, keys, codec.encode(ts, columns, nulls))
        return pb.PushFeaturesResponse(rows_written=rows, view_version=spec.version)


def _column(f: pb.Feature, col: pb.FeatureValues, rows: int) -> tuple[np.ndarray, np.ndarray]:
    field = f"features[{f.name}]"
    kinds = {"double_values": col.double_values, "int64_values": col.int64_values,
             "bool_values": col.bool_values, "string_values": col.string_values}
    want = ("double_values" if f.dtype in FLOATS else "int64_values" if f.dtype in INTS
            else "bool_values" if f.dtype == _DT.DATA_TYPE_BOOL else "string_values")
    for kind, values in kinds.items():
        if kind != want and len(values):
            dtype = types_pb2.DataType.Name(f.dtype).removeprefix("DATA_TYPE_")
            raise InvalidArgument(field, f"feature '{f.name}' is {dtype}; got {kind}")
    values = kinds[want]
    if len(values) != rows:
        raise InvalidArgument(field, f"feature '{f.name}': {len(values)} values for {rows} rows")
    if col.statuses and len(col.statuses) != rows:
        raise InvalidArgument(f"{field}.statuses", f"{len(col.statuses)} statuses for {rows} rows")
    null = (np.asarray(col.statuses, dtype=np.int32) == pb.FEATURE_STATUS_NULL_VALUE) if col.statuses \
        else np.zeros(rows, dtype=bool)
    if want == "string_values":
        return np.array(list(values), dtype=object), null
    arr = np.asarray(values, dtype={"double_values": np.float64, "int64_values": np.int64,
                                    "bool_values": np.bool_}[want])
    if want == "double_values" and np.isnan(arr[~null]).any():
        row = int(np.flatnonzero(np.isnan(arr) & ~null)[0])
        raise InvalidArgument(f"rows[{row}].{f.name}", "NaN is not a value; mark the row NULL_VALUE instead")
    if f.dtype == _DT.DATA_TYPE_INT32 and ((arr < -2**31) | (arr >= 2**31)).any():
        row = int(np.flatnonzero((arr < -2**31) | (arr >= 2**31))[0])
        raise InvalidArgument(f"rows[{row}].{f.name}", f"{arr[row]} does not fit INT32")
    return arr, null


def validate_rules(f: pb.Feature, values: np.ndarray, null: np.ndarray) -> None:
    """The view's rules for this feature, vectorised; the first violating row is reported."""
    r = f.validation
    rows = len(values)
    if r.has_max_null_rate and rows and null.mean() > r.max_null_rate:
        raise InvalidArgument(f"features[{f.name}]", f"feature '{f.name}': {null.mean():.3f} of the rows are null; "
                              f"the limit is {r.max_null_rate:g}")
    valid = ~null
    if r.has_min and (bad := np.flatnonzero(valid & (values < r.min))).size:
        raise InvalidArgument(f"rows[{bad[0]}].{f.name}", f"{values[bad[0]]} is below the minimum {r.min:g}")
    if r.has_max and (bad := np.flatnonzero(valid & (values > r.max))).size:
        raise InvalidArgument(f"rows[{bad[0]}].{f.name}", f"{values[bad[0]]} is above the maximum {r.max:g}")
    if r.allowed_values:
        allowed = set(r.allowed_values)
        for i in np.flatnonzero(valid):
            if values[i] not in allowed:
                raise InvalidArgument(f"rows[{i}].{f.name}", f"'{values[i]}' is not an allowed value "
                                      f"({', '.join(sorted(allowed))})")
