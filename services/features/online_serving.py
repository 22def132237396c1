"""Online reads and pushes (`OnlineFeatures`): requests in columnar form, numpy in between, no
per-value Python for numeric features.

Reads: feature references are grouped by view; each view is read with one call to the online
store for all entity rows (one MGET in Redis); statuses say PRESENT, NOT_FOUND, EXPIRED (older
than the view's ttl) or NULL_VALUE -- a missing value is never a silent zero.
Pushes: the whole batch is checked (types, entity keys, validation rules) before anything is
written; the first problem is reported with its row and feature, and nothing is written.

A read answers `OnlineRows`, the rows as the store holds them: `values()` decodes the typed
answer; the raw answer is written from them by the transport (wire.py), straight to bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from services.common.errors import InvalidArgument, NotFound, quote
from services.common.swr_cache import NotCached, SwrCache
from services.features import prom_metrics
from services.features.definitions import Definitions, ViewDef, one_feature_list, parse_refs
from services.features.online import FLOATS, INTS, Decoded, OnlineStore, RowCodec
from services.features.types import (
    DataType, Feature, FeatureStatus, FeatureValues, FeatureView, KeyColumn, OnlineQuery, OnlineValues, PushRequest,
    PushResult, ValueColumn, ValueType, type_name,
)

KEY_SEP = "\x1f"
# Enum values as plain ints (an attribute lookup on the enum costs a Python call).
PRESENT, NOT_FOUND, EXPIRED, NULL_VALUE = (int(FeatureStatus.PRESENT), int(FeatureStatus.NOT_FOUND),
                                           int(FeatureStatus.EXPIRED), int(FeatureStatus.NULL_VALUE))
_BOOL = int(DataType.BOOL)
#: How far ahead of this service's clock a pushed event time may be (client clocks drift). A row
#: from further ahead would be served as PRESENT past its ttl and, being the newest, would hide
#: every later push for its key. STRATA_FEATURES_MAX_FUTURE_SKEW_SECONDS (app.FeaturesConfig).
DEFAULT_MAX_FUTURE_SKEW_SECONDS = 300


@dataclass(eq=False)
class CachedView:
    """A view version as reads use it: its definition, row codec and feature types. Hashed by
    identity, so what a reader derives from it (wire.py's encoded names) can be kept with it."""

    view: ViewDef
    codec: RowCodec
    types: dict[str, int] = field(init=False)  # feature name -> DataType

    def __post_init__(self) -> None:
        self.types = {f.name: f.dtype for f in self.view.spec.features}


@dataclass
class ReadStep:
    """One view's part of a read: its definition, the wanted (position, feature), the row keys."""

    cached: CachedView
    wanted: list[tuple[int, str]]
    keys: list[str]


def statuses(spec: FeatureView, decoded: Decoded, now_us: int) -> np.ndarray | None:
    """FeatureStatus of every feature of the view and row, (features, rows) uint8, or None
    when all are PRESENT (the usual case, answered without building the array)."""
    expired = (decoded.event_us < now_us - spec.ttl_seconds * 1_000_000) if spec.ttl_seconds else None
    if decoded.found.all() and (expired is None or not expired.any()) and not decoded.nulls.any():
        return None
    base = np.full(len(decoded.found), PRESENT, np.uint8)
    if expired is not None:
        base[expired] = EXPIRED
    base[~decoded.found] = NOT_FOUND
    return np.where(decoded.nulls & (base == PRESENT), np.uint8(NULL_VALUE), base)


@dataclass
class OnlineRows:
    """The rows an online read found, per view (`steps` and `blobs` line up), read at `now_us`:
    what its answer is built from. `features`: the references in the request's order."""

    features: Sequence[str]
    steps: list[ReadStep]
    blobs: list[list[bytes | None]]
    now_us: int
    raw: bool

    def values(self) -> OnlineValues:
        """The typed answer: one column per requested feature, with statuses and event times."""
        names = self.features
        columns: list = [None] * len(names)  # FeatureValues per requested position
        versions: dict[str, int] = {}
        for step, view_blobs in zip(self.steps, self.blobs, strict=True):
            cached = step.cached
            spec, codec, types = cached.view.spec, cached.codec, cached.types
            decoded = codec.decode(view_blobs)
            versions[spec.name] = spec.version
            status = statuses(spec, decoded, self.now_us)
            if status is None:
                status = np.full(decoded.nulls.shape, PRESENT, np.uint8)
            # Lists, not numpy arrays: the transport (protobuf) converts a list in C, an array per element.
            event_us = decoded.event_us.tolist()
            for i, feature in step.wanted:
                dtype = types[feature]
                values = codec.values(decoded, feature)
                if isinstance(values, np.ndarray):
                    values = values.tolist()
                kind = ("double_values" if dtype in FLOATS else "int64_values" if dtype in INTS
                        else "bool_values" if dtype == _BOOL else "string_values")
                columns[i] = FeatureValues(names[i], **{kind: values},
                                           statuses=status[codec.null_index[feature]].tolist(),
                                           event_timestamps_us=event_us)
        return OnlineValues(columns, versions)


class ViewCache(SwrCache[str, CachedView]):
    """Current view definitions, re-read at most every `max_age` seconds (definitions change
    rarely; a process that applied a change drops its entry at once). Stale-while-revalidate
    (services/common/swr_cache.py): `fresh` on the event loop, `current` in worker threads, `get`
    to read a missing or old definition now; a re-read that finds the same version and update
    time keeps the entry (its codec, and what readers derived from it)."""

    def __init__(self, definitions: Definitions, max_age: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(self._read, max_age, clock, what="feature view")
        self.definitions = definitions

    def _read(self, name: str, cached: CachedView | None) -> CachedView:
        view = self.definitions.get_view(name)
        if cached is not None and (cached.view.spec.version, cached.view.spec.update_time) == \
                (view.spec.version, view.spec.update_time):
            return cached
        return CachedView(view, RowCodec(view.spec))

    def warm(self, limit: int = 1000) -> int:
        """Load the current definitions of up to `limit` views (in name order) before the first
        call, so that no first read waits for the definitions database (Feast users report a
        ~300 ms first request, feast-dev/feast#2952). Returns how many were loaded; the rest load
        on first use."""
        loaded, after = 0, ""
        while loaded < limit:
            page = self.definitions.search(page_size=min(500, limit - loaded), after=after)
            if not page:
                break
            for spec in page:
                try:
                    self.get(spec.name)
                    loaded += 1
                except NotFound:  # deleted meanwhile
                    pass
            after = page[-1].name
        return loaded


class FeatureSetCache(SwrCache[str, tuple[str, ...]]):
    """Feature set name -> its references, for reads by set; re-read as ViewCache."""

    def __init__(self, definitions: Definitions, max_age: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(lambda name, _cached: tuple(definitions.get_feature_set(name).features),
                         max_age, clock, what="feature set")


def with_feature_set(query: OnlineQuery, refs: Sequence[str]) -> OnlineQuery:
    """The query with the set's references as its features."""
    one_feature_list(query.features, query.feature_set)
    return replace(query, features=refs, feature_set="")


def entity_keys(view: ViewDef, columns: Mapping[str, KeyColumn], field: str = "entities") -> list[str]:
    """One string key per row: the join key values, typed as the entities declare."""
    cols, rows = [], -1
    for e in view.entities:
        col = columns.get(e.join_key)
        if col is None:
            raise InvalidArgument(f"{field}[{e.join_key}]", f"view '{view.spec.name}' needs join key "
                                  f"'{e.join_key}' (entity {e.name})")
        if e.value_type == ValueType.INT64:
            if col.string_values:
                raise InvalidArgument(f"{field}[{e.join_key}]", f"entity {e.name} is keyed by INT64; "
                                      "got string values")
            values = list(map(str, col.int64_values))
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


class OnlineFeatures:
    """Online reads (`read` blocking, `read_async` on the event loop) and pushes of the feature
    views in `views`, over the online store."""

    def __init__(self, views: ViewCache, store: OnlineStore, clock: Callable[[], float] = time.time,
                 offline_append: Callable[[ViewDef, dict[str, KeyColumn], np.ndarray, dict, dict], None]
                 | None = None, max_future_skew_seconds: float = DEFAULT_MAX_FUTURE_SKEW_SECONDS) -> None:
        self.views = views
        self.sets = FeatureSetCache(views.definitions)
        self.store = store
        self._clock = clock
        #: Pushed event times may be at most this far ahead of `clock`, in microseconds.
        self.max_future_skew_us = int(max_future_skew_seconds * 1_000_000)
        # Pushed rows also go to the view's offline source, so training later sees what serving saw.
        self.offline_append = offline_append
        # Feature list -> its references grouped by view: (position, feature) in request order.
        self._groups: dict[tuple[str, ...], dict[str, list[tuple[int, str]]]] = {}

    # -- reads -----------------------------------------------------------------------------------
    def read(self, query: OnlineQuery) -> OnlineRows:
        """Blocking: for worker threads and stores without async reads."""
        if query.feature_set:
            query = with_feature_set(query, self.sets.current(query.feature_set))
        plan = self._plan(query, self.views.current)
        return self._rows(query, plan, self.store.read_many(self._reads(plan)))

    async def read_async(self, query: OnlineQuery) -> OnlineRows:
        """On the event loop: the store read is awaited (pipelined with the other calls in
        flight). Only a view not cached yet sends the planning (a database read) to a worker
        thread; cached ones are re-read in the background."""
        if query.feature_set:
            query = with_feature_set(query, await self.sets.get_async(query.feature_set))
        try:
            plan = self._plan(query, self.views.fresh)
        except NotCached:
            plan = await asyncio.to_thread(self._plan, query, self.views.get)
        return self._rows(query, plan, await self.store.read_many_async(self._reads(plan)))

    def _plan(self, query: OnlineQuery, lookup: Callable[[str], CachedView]) -> list[ReadStep]:
        if not query.features:
            raise InvalidArgument("features", "no features requested")
        refs = tuple(query.features)
        by_view = self._groups.get(refs)
        if by_view is None:
            by_view = {}
            for i, (view, feature) in enumerate(parse_refs(refs)):
                by_view.setdefault(view, []).append((i, feature))
            if len(self._groups) >= 4096:  # clients ask for a few lists of features, over and over
                self._groups.clear()
            self._groups[refs] = by_view
        plan = []
        for view_name, wanted in by_view.items():
            cached = lookup(view_name)
            for i, feature in wanted:
                if feature not in cached.types:
                    raise InvalidArgument(f"features[{i}]", f"view '{view_name}' (version {cached.view.spec.version}) "
                                          f"has no feature {quote(feature)}")
            plan.append(ReadStep(cached, wanted, entity_keys(cached.view, query.entities)))
        return plan

    @staticmethod
    def _reads(plan: list[ReadStep]) -> list[tuple[str, int, list[str]]]:
        # Every view's rows in one round trip to the store.
        return [(s.cached.view.spec.name, s.cached.view.spec.version, s.keys) for s in plan]

    def _rows(self, query: OnlineQuery, plan: list[ReadStep], blobs: list[list[bytes | None]]) -> OnlineRows:
        return OnlineRows(query.features, plan, blobs, int(self._clock() * 1e6), query.raw)

    # -- pushes ----------------------------------------------------------------------------------
    def push(self, request: PushRequest) -> PushResult:
        cached = self.views.get(request.view)
        spec, codec = cached.view.spec, cached.codec
        keys = entity_keys(cached.view, request.entities)
        rows = len(keys)
        if not rows:
            raise InvalidArgument("entities", "no rows")
        ts = np.asarray(request.event_timestamps_us, dtype=np.int64)
        if len(ts) != rows:
            raise InvalidArgument("event_timestamps_us", f"{len(ts)} timestamps for {rows} rows")
        if ts.min() <= 0:
            row = int(np.argmin(ts))
            raise InvalidArgument(f"event_timestamps_us[{row}]", f"row {row}: the event time must be positive "
                                  "microseconds since the epoch")
        latest = int(self._clock() * 1_000_000) + self.max_future_skew_us
        if ts.max() > latest:
            row = int(np.argmax(ts > latest))
            ahead = (int(ts[row]) - latest + self.max_future_skew_us) / 1e6
            raise InvalidArgument(f"event_timestamps_us[{row}]", f"row {row}: the event time {int(ts[row])} us is "
                                  f"{ahead:.6g} s ahead of the service's clock; at most "
                                  f"{self.max_future_skew_us / 1e6:g} s is accepted "
                                  "(STRATA_FEATURES_MAX_FUTURE_SKEW_SECONDS)")
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
            raise InvalidArgument(f"features[{quote(name, bare=True)}]", f"view '{spec.name}' (version "
                                  f"{spec.version}) has no feature {quote(name)}")
        if self.offline_append is not None:  # first: the durable record; a failure writes nothing online
            self.offline_append(cached.view, dict(request.entities), ts, columns, nulls)
        self.store.write(spec.name, spec.version, keys, codec.encode(ts, columns, nulls))
        prom_metrics.pushed(spec.name, int(ts.max()), rows)
        return PushResult(rows_written=rows, view_version=spec.version)


def _column(f: Feature, col: ValueColumn, rows: int) -> tuple[np.ndarray, np.ndarray]:
    field = f"features[{f.name}]"
    kinds = {"double_values": col.double_values, "int64_values": col.int64_values,
             "bool_values": col.bool_values, "string_values": col.string_values}
    want = ("double_values" if f.dtype in FLOATS else "int64_values" if f.dtype in INTS
            else "bool_values" if f.dtype == DataType.BOOL else "string_values")
    for kind, values in kinds.items():
        if kind != want and len(values):
            raise InvalidArgument(field, f"feature '{f.name}' is {type_name(f.dtype)}; got {kind}")
    values = kinds[want]
    if len(values) != rows:
        raise InvalidArgument(field, f"feature '{f.name}': {len(values)} values for {rows} rows")
    if col.statuses and len(col.statuses) != rows:
        raise InvalidArgument(f"{field}.statuses", f"{len(col.statuses)} statuses for {rows} rows")
    null = (np.asarray(col.statuses, dtype=np.int32) == NULL_VALUE) if col.statuses \
        else np.zeros(rows, dtype=bool)
    if want == "string_values":
        return np.array(list(values), dtype=object), null
    arr = np.asarray(values, dtype={"double_values": np.float64, "int64_values": np.int64,
                                    "bool_values": np.bool_}[want])
    if want == "double_values" and np.isnan(arr[~null]).any():
        row = int(np.flatnonzero(np.isnan(arr) & ~null)[0])
        raise InvalidArgument(f"rows[{row}].{f.name}", "NaN is not a value; mark the row NULL_VALUE instead")
    if f.dtype == DataType.INT32 and ((arr < -2**31) | (arr >= 2**31)).any():
        row = int(np.flatnonzero((arr < -2**31) | (arr >= 2**31))[0])
        raise InvalidArgument(f"rows[{row}].{f.name}", f"{arr[row]} does not fit INT32")
    return arr, null


def validate_rules(f: Feature, values: np.ndarray, null: np.ndarray) -> None:
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
                raise InvalidArgument(f"rows[{i}].{f.name}", f"{quote(values[i])} is not an allowed value "
                                      f"({', '.join(sorted(allowed))})")
