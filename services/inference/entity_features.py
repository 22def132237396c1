"""Serving by entity key. A model trained from the feature store names, in its registry lineage,
the feature references it reads ("{view}:{feature}", one per model input, in the training set's
column order) and the view versions it was trained on. A Predict that sends entity keys has those
features read online for its rows (one read per request), checked to come from the versions the
model was trained on, completed by the feature set's missing-value policy (a declared default, or
the request is refused: never a silent zero), and handed to the model as one [rows, 1] column per
input, named as the training set named its columns ("{view}__{feature}"). Serving reads exactly
what training read.

Plain values only; the feature service is behind `FeatureReader` (feature_client.py over gRPC).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.common.errors import FailedPrecondition, InvalidArgument, quote
from services.inference.runtime import TensorInfo

# FeatureStatus values of the feature service's reads (strata.features.v1.FeatureStatus).
PRESENT, NOT_FOUND, EXPIRED, NULL_VALUE = 1, 2, 3, 4
_WHY = {NOT_FOUND: "has no online row", EXPIRED: "is expired (older than its view's ttl)", NULL_VALUE: "is null"}
#: Entity rows per request: a read of more is a batch job's work (and one gRPC message).
MAX_ENTITIES = 10_000
_MAX_INT64 = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class FeatureLineage:
    """What a model version's lineage says it was trained from."""

    features: tuple[str, ...]         # "{view}:{feature}", one per model input, in input order
    view_versions: Mapping[str, int]  # view -> the version trained on
    feature_set: str = ""

    @classmethod
    def of(cls, features: Sequence[str], feature_views: Sequence[str], feature_set: str) -> FeatureLineage | None:
        """From the registry's lineage fields (None: not trained from the feature store)."""
        if not features:
            return None
        views = {}
        for fv in feature_views:  # "name:version"
            name, _, version = fv.rpartition(":")
            views[name] = int(version)
        return cls(tuple(features), views, feature_set)


@dataclass(frozen=True, slots=True)
class OnlineColumn:
    """One feature for every entity row: values (float64, int64 or bool) and, when any is not
    PRESENT, the FeatureStatus of each row (None: all PRESENT)."""

    values: np.ndarray
    statuses: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class OnlineRead:
    columns: Sequence[OnlineColumn]   # in the order asked
    view_versions: Mapping[str, int]  # the version each view was read at


class FeatureReader(Protocol):
    """The feature service as serving needs it. Errors are StrataErrors: INVALID_ARGUMENT (the
    caller's keys), FAILED_PRECONDITION (a view or set that is gone), UNAVAILABLE."""

    async def read(self, features: Sequence[str], keys: Mapping[str, list]) -> OnlineRead:
        """The features of the entity rows `keys` (join key -> one int or str per row)."""
        ...

    async def defaults(self, feature_set: str) -> Mapping[str, float]:
        """The set's declared defaults (reference -> value); {} without a set."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Binding:
    """A loaded model's inputs matched to its lineage's features (made once per loaded model)."""

    lineage: FeatureLineage
    inputs: tuple[tuple[str, TensorInfo], ...]  # (input name, its spec) per feature, in lineage order


def entity_keys(rows: Sequence[Mapping[str, object]]) -> dict[str, list]:
    """Entity rows ({join key: key}) as columns: join key -> one int or str per row. A key is a
    whole number (JSON numbers arrive as floats) or a string, of one kind per join key."""
    if len(rows) > MAX_ENTITIES:
        raise InvalidArgument("entities", f"{len(rows)} entity rows; at most {MAX_ENTITIES} per request "
                              "(use a batch job for more)")
    names = list(rows[0]) if rows else []
    if not names:
        raise InvalidArgument("entities[0]", "an entity row names at least one join key")
    columns: dict[str, list] = {n: [] for n in names}
    for i, row in enumerate(rows):
        if len(row) != len(names) or any(n not in row for n in names):
            raise InvalidArgument(f"entities[{i}]", f"every row names the same join keys ({', '.join(names)}); "
                                  f"this one has {', '.join(map(str, row))}")
        for n in names:
            columns[n].append(_key(row[n], f"entities[{i}].{n}"))
    for n, keys in columns.items():
        if len({type(k) for k in keys}) > 1:
            raise InvalidArgument(f"entities[].{n}", f"join key {quote(n)} mixes numbers and strings")
    return columns


def _key(value: object, field_name: str) -> int | str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(field_name, f"an entity key is a whole number or a string, not {type(value).__name__}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InvalidArgument(field_name, f"{value!r} is not a whole number")
    if not -_MAX_INT64 - 1 <= value <= _MAX_INT64:
        raise InvalidArgument(field_name, f"{value!r} does not fit an int64 key")
    return int(value)


def bind(name: str, lineage: FeatureLineage | None, specs: Mapping[str, TensorInfo]) -> Binding:
    """A model's inputs matched to its lineage's features (FAILED_PRECONDITION when the model was
    not trained from the feature store, or its inputs are not its lineage's features)."""
    if lineage is None:
        raise FailedPrecondition(f"{name} was not trained from the feature store (its lineage names no "
                                 "features): send inputs or rows, not entities")
    inputs = []
    for ref in lineage.features:
        view, _, feature = ref.partition(":")
        column = f"{view}__{feature}"
        spec = specs.get(column)
        if spec is None:
            raise FailedPrecondition(f"{name} has no input {quote(column)} for its lineage's feature {quote(ref)}")
        inputs.append((column, spec))
    unread = specs.keys() - {c for c, _ in inputs}
    if unread:
        raise FailedPrecondition(f"{name}'s inputs {sorted(unread)[:5]} are not features of its lineage")
    return Binding(lineage, tuple(inputs))


class _Pending:
    __slots__ = ("future", "keys", "rows")

    def __init__(self, keys: Mapping[str, list], future: asyncio.Future) -> None:
        self.keys, self.future = keys, future
        self.rows = len(next(iter(keys.values())))


class ReadCoalescer:
    """At most `in_flight` reads of one feature list and key layout at a time; requests that
    arrive while they are busy wait and go together in the next read (their entity rows
    concatenated, the answer cut back per request), as a dynamic batcher forms a batch as soon as
    the model is free. One request alone is read at once: coalescing adds no wait, it only saves
    the per-call cost (two gRPC calls, a Redis round trip) when requests pile up."""

    def __init__(self, reader: FeatureReader, in_flight: int = 2, max_rows: int = MAX_ENTITIES) -> None:
        self.reader, self.in_flight, self.max_rows = reader, in_flight, max_rows
        self._busy: dict[tuple, int] = {}
        self._queues: dict[tuple, list[_Pending]] = {}

    async def read(self, features: tuple[str, ...], keys: Mapping[str, list]) -> OnlineRead:
        group = (features, tuple((k, type(v[0])) for k, v in keys.items()))  # one key layout per read
        if self._busy.get(group, 0) < self.in_flight:
            self._busy[group] = self._busy.get(group, 0) + 1
            try:
                return await self.reader.read(features, keys)
            finally:
                self._release(group)
        pending = _Pending(keys, asyncio.get_running_loop().create_future())
        self._queues.setdefault(group, []).append(pending)
        return await pending.future

    def _release(self, group: tuple) -> None:
        queue = self._queues.get(group)
        if not queue:
            self._busy[group] -= 1
            return
        batch, rows = [], 0
        while queue and (not batch or rows + queue[0].rows <= self.max_rows):
            rows += queue[0].rows
            batch.append(queue.pop(0))
        # The freed slot goes to the batch's read (the count stays).
        asyncio.get_running_loop().create_task(self._read_batch(group, batch))

    async def _read_batch(self, group: tuple, batch: list[_Pending]) -> None:
        try:
            keys = {k: [x for p in batch for x in p.keys[k]] for k in batch[0].keys}
            got = await self.reader.read(group[0], keys)
        except BaseException as e:  # every waiting request gets the same error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            if not isinstance(e, Exception):
                raise
        else:
            start = 0
            for p in batch:
                end = start + p.rows
                part = OnlineRead([OnlineColumn(c.values[start:end], None if c.statuses is None
                                                else c.statuses[start:end]) for c in got.columns],
                                  got.view_versions)
                if not p.future.done():
                    p.future.set_result(part)
                start = end
        finally:
            self._release(group)


class EntityFeatures:
    """Feeds for a model from entity keys, through a `FeatureReader` (reads coalesced)."""

    def __init__(self, reader: FeatureReader) -> None:
        self.reader = reader
        self._reads = ReadCoalescer(reader)

    async def feeds(self, binding: Binding, name: str, entities: Sequence[Mapping[str, object]]
                    ) -> dict[str, np.ndarray]:
        lineage = binding.lineage
        keys = entity_keys(entities)
        got = await self._reads.read(lineage.features, keys)
        for view, version in lineage.view_versions.items():
            served = got.view_versions.get(view)
            if served is not None and served != version:
                raise FailedPrecondition(f"{name} was trained on view {quote(view)} version {version}; the online "
                                         f"store serves version {served}: retrain it on the current version")
        defaults: Mapping[str, float] | None = None
        feeds: dict[str, np.ndarray] = {}
        for ref, (column, spec), col in zip(lineage.features, binding.inputs, got.columns, strict=True):
            values = col.values
            if col.statuses is not None:
                missing = col.statuses != PRESENT
                if missing.any():
                    if defaults is None:
                        defaults = await self.reader.defaults(lineage.feature_set) if lineage.feature_set else {}
                    default = defaults.get(ref)
                    if default is None:
                        row = int(np.argmax(missing))
                        keys_text = ", ".join(f"{k}={v[row]!r}" for k, v in keys.items())
                        policy = (f"feature set {quote(lineage.feature_set)} declares no default for it"
                                  if lineage.feature_set else "the model names no feature set with defaults")
                        raise FailedPrecondition(f"entities[{row}] ({keys_text}): feature {quote(ref)} "
                                                 f"{_WHY.get(int(col.statuses[row]), 'is missing')}, and {policy}")
                    values = np.where(missing, default, values.astype(np.float64))
            arr = np.asarray(values, dtype=spec.dtype)
            if len(spec.shape) == 2 and spec.shape[-1] == 1:
                arr = arr.reshape(-1, 1)
            feeds[column] = arr
        return feeds

