"""The stored form of what the feature service keeps in its database: entities, feature view
versions, feature sets, materialization statistics and training-set datasets, each as one JSON
text (the `spec`, `stats` and `dataset` columns of tables.py), and the schema hash that decides a
view's version.

Every field is written, enums as their integer values, timestamps as ISO 8601 with the UTC
offset (None as null); a missing field reads as its default. Migration 0006 converted the rows
written before as serialized protobuf to this form; it repeats `schema_hash`, which must stay as
it is for the hashes already stored (a change would make every unchanged view a new version).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from services.features.types import (
    Dataset, DataSource, DataType, Entity, Feature, FeatureSet, FeatureStatistics, FeatureView, Statistics,
    ValidationRule, ValueType,
)


def _time(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _parse_time(s: str | None) -> datetime | None:
    return None if s is None else datetime.fromisoformat(s)


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def schema_hash(v: FeatureView) -> str:
    """What makes a new version: entities, features with types, ttl, source."""
    schema = {"entities": list(v.entities), "ttl_seconds": v.ttl_seconds,
              "source": [v.source.path, v.source.timestamp_field, v.source.created_timestamp_field],
              "features": [[f.name, int(f.dtype)] for f in v.features]}
    return hashlib.sha256(_dump(schema).encode()).hexdigest()


# -- entities ------------------------------------------------------------------------------------
def entity_json(e: Entity) -> str:
    return _dump({"name": e.name, "join_key": e.join_key, "value_type": int(e.value_type),
                  "description": e.description, "owner": e.owner, "tags": dict(e.tags),
                  "create_time": _time(e.create_time)})


def entity_from_json(text: str) -> Entity:
    d = json.loads(text)
    return Entity(name=d["name"], join_key=d.get("join_key", ""), value_type=ValueType(d.get("value_type", 0)),
                  description=d.get("description", ""), owner=d.get("owner", ""), tags=d.get("tags", {}),
                  create_time=_parse_time(d.get("create_time")))


# -- feature views -------------------------------------------------------------------------------
def _feature(f: Feature) -> dict[str, Any]:
    r = f.validation
    return {"name": f.name, "dtype": int(f.dtype), "description": f.description,
            # Doubles as floats, however given: 0 and 0.0 are one rule (the stored forms compare).
            "validation": {"min": float(r.min), "has_min": r.has_min, "max": float(r.max), "has_max": r.has_max,
                           "allowed_values": list(r.allowed_values), "max_null_rate": float(r.max_null_rate),
                           "has_max_null_rate": r.has_max_null_rate}}


def _feature_from(d: dict[str, Any]) -> Feature:
    r = d.get("validation", {})
    return Feature(name=d["name"], dtype=DataType(d.get("dtype", 0)), description=d.get("description", ""),
                   validation=ValidationRule(
                       min=r.get("min", 0.0), has_min=r.get("has_min", False), max=r.get("max", 0.0),
                       has_max=r.get("has_max", False), allowed_values=tuple(r.get("allowed_values", ())),
                       max_null_rate=r.get("max_null_rate", 0.0), has_max_null_rate=r.get("has_max_null_rate", False)))


def view_json(v: FeatureView) -> str:
    return _dump({"name": v.name, "version": v.version, "entities": list(v.entities),
                  "features": [_feature(f) for f in v.features], "ttl_seconds": v.ttl_seconds,
                  "source": {"path": v.source.path, "timestamp_field": v.source.timestamp_field,
                             "created_timestamp_field": v.source.created_timestamp_field},
                  "owner": v.owner, "description": v.description, "tags": dict(v.tags),
                  "create_time": _time(v.create_time), "update_time": _time(v.update_time),
                  "created_by": v.created_by})


def view_from_json(text: str) -> FeatureView:
    d = json.loads(text)
    s = d.get("source", {})
    return FeatureView(
        name=d["name"], version=d.get("version", 0), entities=tuple(d.get("entities", ())),
        features=tuple(_feature_from(f) for f in d.get("features", ())), ttl_seconds=d.get("ttl_seconds", 0),
        source=DataSource(path=s.get("path", ""), timestamp_field=s.get("timestamp_field", ""),
                          created_timestamp_field=s.get("created_timestamp_field", "")),
        owner=d.get("owner", ""), description=d.get("description", ""), tags=d.get("tags", {}),
        create_time=_parse_time(d.get("create_time")), update_time=_parse_time(d.get("update_time")),
        created_by=d.get("created_by", ""))


# -- feature sets --------------------------------------------------------------------------------
def feature_set_json(fs: FeatureSet) -> str:
    return _dump({"name": fs.name, "features": list(fs.features), "description": fs.description,
                  "owner": fs.owner, "tags": dict(fs.tags), "defaults": dict(sorted(fs.defaults.items())),
                  "create_time": _time(fs.create_time), "update_time": _time(fs.update_time)})


def feature_set_from_json(text: str) -> FeatureSet:
    d = json.loads(text)
    return FeatureSet(name=d["name"], features=tuple(d.get("features", ())), description=d.get("description", ""),
                      owner=d.get("owner", ""), tags=d.get("tags", {}), defaults=d.get("defaults", {}),
                      create_time=_parse_time(d.get("create_time")), update_time=_parse_time(d.get("update_time")))


# -- statistics and datasets ---------------------------------------------------------------------
def statistics_json(s: Statistics) -> str:
    return _dump({"view_version": s.view_version, "compute_time": _time(s.compute_time), "start_us": s.start_us,
                  "end_us": s.end_us, "features": [
                      {"name": f.name, "count": f.count, "nulls": f.nulls, "min": float(f.min), "max": float(f.max),
                       "mean": float(f.mean), "std": float(f.std), "quantiles": list(map(float, f.quantiles)),
                       "distinct": f.distinct}
                      for f in s.features]})


def statistics_from_json(text: str) -> Statistics:
    d = json.loads(text)
    return Statistics(view_version=d.get("view_version", 0), compute_time=_parse_time(d.get("compute_time")),
                      start_us=d.get("start_us", 0), end_us=d.get("end_us", 0), features=tuple(
                          FeatureStatistics(name=f["name"], count=f.get("count", 0), nulls=f.get("nulls", 0),
                                            min=f.get("min", 0.0), max=f.get("max", 0.0), mean=f.get("mean", 0.0),
                                            std=f.get("std", 0.0), quantiles=tuple(f.get("quantiles", ())),
                                            distinct=f.get("distinct", 0))
                          for f in d.get("features", ())))


def dataset_json(ds: Dataset) -> str:
    return _dump({"dataset_id": ds.dataset_id, "uri": ds.uri, "sha256": ds.sha256, "rows": ds.rows,
                  "features": list(ds.features), "feature_set": ds.feature_set, "created_by": ds.created_by,
                  "create_time": _time(ds.create_time)})


def dataset_from_json(text: str) -> Dataset:
    d = json.loads(text)
    return Dataset(dataset_id=d.get("dataset_id", ""), uri=d.get("uri", ""), sha256=d.get("sha256", ""),
                   rows=d.get("rows", 0), features=tuple(d.get("features", ())), feature_set=d.get("feature_set", ""),
                   created_by=d.get("created_by", ""), create_time=_parse_time(d.get("create_time")))
