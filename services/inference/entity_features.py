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


class EntityFeatures:
    """Feeds for a model from entity keys, through a `FeatureReader`."""

    def __init__(self, reader: FeatureReader) -> None:
        self.reader = reader

    async def feeds(self, binding: Binding, name: str, entities: Sequence[Mapping[str, object]]
                    ) -> dict[str, np.ndarray]:
        lineage = binding.lineage
        keys = entity_keys(entities)
        got = await self.reader.read(lineage.features, keys)
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

