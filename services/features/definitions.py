"""Feature definitions: entities and versioned feature views, with search.

A view's schema -- its entities, features and their types, ttl and source -- decides its
version: applying a different schema creates version N+1 and keeps N readable (training sets
and online rows name the version they were built with); applying new description, owner, tags or
validation rules updates the current version in place; applying the same definition is a no-op.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy import and_, insert, select, update
from sqlalchemy.exc import IntegrityError

from services.common.db import Database
from services.common.errors import InvalidArgument, NotFound, quote
from services.common.limits import check_filter
from services.common.paging import PageRequest
from services.common.timeutil import utc_now
from services.features import tables as t
from services.features.records import (
    entity_from_json, entity_json, feature_set_from_json, feature_set_json, schema_hash, view_from_json, view_json,
)
from services.features.types import DataType, Entity, FeatureSet, FeatureView, ValueType

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,62}\Z")
FEATURE_TYPES = {DataType.FLOAT32, DataType.FLOAT64, DataType.INT32, DataType.INT64, DataType.BOOL, DataType.STRING}
NUMERIC_TYPES = {DataType.FLOAT32, DataType.FLOAT64, DataType.INT32, DataType.INT64}


@dataclass(frozen=True)
class ViewDef:
    """A view version with its entities resolved (what readers and writers need)."""

    spec: FeatureView
    entities: tuple[Entity, ...]

    @property
    def join_keys(self) -> tuple[str, ...]:
        return tuple(e.join_key for e in self.entities)


def parse_refs(refs: Sequence[str], field: str = "features") -> list[tuple[str, str]]:
    """Feature references "view:feature" as (view, feature); INVALID_ARGUMENT names the bad one."""
    out = []
    for i, ref in enumerate(refs):
        view, sep, feature = ref.partition(":")
        if not sep or not view or not feature:
            raise InvalidArgument(f"{field}[{i}]", f"{quote(ref)} is not a feature reference (view:feature)")
        out.append((view, feature))
    return out


def one_feature_list(features: Sequence[str], feature_set: str) -> None:
    """A read names its features or a feature set, not both (INVALID_ARGUMENT naming feature_set)."""
    if feature_set and features:
        raise InvalidArgument("feature_set", "give features or feature_set, not both")


def _set_definition(fs: FeatureSet) -> FeatureSet:
    """The set without its timestamps: what an apply compares."""
    return replace(fs, create_time=None, update_time=None)


def _view_definition(v: FeatureView) -> FeatureView:
    """What an apply stores of the view given (the service sets version and times), with its
    sequences and tags as plain tuples and dicts (a caller's containers are not kept)."""
    return replace(v, version=0, create_time=None, update_time=None, entities=tuple(v.entities),
                   features=tuple(replace(f, dtype=DataType(f.dtype), validation=replace(
                       f.validation, allowed_values=tuple(f.validation.allowed_values))) for f in v.features),
                   tags=dict(v.tags))


def validate_view(v: FeatureView) -> None:
    if not NAME_RE.match(v.name):
        raise InvalidArgument("feature_view.name", f"{quote(v.name)} is not a valid name ([a-z0-9][a-z0-9_]{{0,62}})")
    if not v.entities:
        raise InvalidArgument("feature_view.entities", "at least one entity is required")
    if len(set(v.entities)) != len(v.entities):
        raise InvalidArgument("feature_view.entities", "an entity is listed twice")
    if not v.features:
        raise InvalidArgument("feature_view.features", "at least one feature is required")
    seen = set()
    for i, f in enumerate(v.features):
        field = f"feature_view.features[{i}]"
        if not NAME_RE.match(f.name):
            raise InvalidArgument(f"{field}.name", f"{quote(f.name)} is not a valid feature name")
        if f.name in seen:
            raise InvalidArgument(f"{field}.name", f"feature '{f.name}' is listed twice")
        seen.add(f.name)
        if f.dtype not in FEATURE_TYPES:
            raise InvalidArgument(f"{field}.dtype", f"feature '{f.name}': dtype must be FLOAT32, FLOAT64, INT32, "
                                  "INT64, BOOL or STRING")
        r = f.validation
        if (r.has_min or r.has_max) and f.dtype not in NUMERIC_TYPES:
            raise InvalidArgument(f"{field}.validation", f"feature '{f.name}': min/max need a numeric type")
        if r.has_min and r.has_max and r.min > r.max:
            raise InvalidArgument(f"{field}.validation", f"feature '{f.name}': min {r.min} > max {r.max}")
        if r.allowed_values and f.dtype != DataType.STRING:
            raise InvalidArgument(f"{field}.validation.allowed_values", f"feature '{f.name}': allowed values "
                                  "need a STRING feature")
        if r.has_max_null_rate and not 0 <= r.max_null_rate <= 1:
            raise InvalidArgument(f"{field}.validation.max_null_rate", "must be within 0..1")
    if v.ttl_seconds < 0:
        raise InvalidArgument("feature_view.ttl_seconds", "must not be negative")


class Definitions:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- entities ------------------------------------------------------------------------------
    def apply_entity(self, e: Entity) -> Entity:
        if not NAME_RE.match(e.name):
            raise InvalidArgument("entity.name", f"{quote(e.name)} is not a valid name ([a-z0-9][a-z0-9_]{{0,62}})")
        if e.value_type not in (ValueType.INT64, ValueType.STRING):
            raise InvalidArgument("entity.value_type", "must be VALUE_TYPE_INT64 or VALUE_TYPE_STRING")
        spec = replace(e, join_key=e.join_key or e.name, value_type=ValueType(e.value_type), tags=dict(e.tags))
        if not NAME_RE.match(spec.join_key):
            raise InvalidArgument("entity.join_key", f"{quote(spec.join_key)} is not a valid column name")
        now = utc_now()
        with self.db.session() as c:
            row = c.execute(select(t.entities).where(t.entities.c.name == e.name)).one_or_none()
            if row is None:
                spec = replace(spec, create_time=now)
                c.execute(insert(t.entities).values(name=e.name, spec=entity_json(spec), create_time=now,
                                                    update_time=now))
                return spec
            old = entity_from_json(row.spec)
            if (old.join_key, old.value_type) != (spec.join_key, spec.value_type):
                raise InvalidArgument("entity", f"entity '{e.name}' exists with join key {old.join_key} "
                                      f"(VALUE_TYPE_{ValueType(old.value_type).name}); they cannot change")
            spec = replace(spec, create_time=old.create_time)
            c.execute(update(t.entities).where(t.entities.c.name == e.name)
                      .values(spec=entity_json(spec), update_time=now))
        return spec

    def entities(self, size: int = 0, token: str = "") -> tuple[list[Entity], str]:
        """One page of entities by name, and the next page's token (services/common/paging.py)."""
        page = PageRequest.parse("ListEntities", size, token, key=str)
        stmt = select(t.entities).order_by(t.entities.c.name).limit(page.limit)
        if page.after is not None:
            stmt = stmt.where(t.entities.c.name > page.after)
        with self.db.read() as c:
            rows, next_token = page.cut(c.execute(stmt).all(), lambda r: r.name)
        return [entity_from_json(r.spec) for r in rows], next_token

    def _entities(self, c, names) -> tuple[Entity, ...]:  # noqa: ANN001
        rows = {r.name: entity_from_json(r.spec) for r in
                c.execute(select(t.entities).where(t.entities.c.name.in_(list(names))))}
        for i, n in enumerate(names):
            if n not in rows:
                raise NotFound(f"entities/{quote(n, bare=True)} not found (feature_view.entities[{i}]); "
                               "apply the entity first")
        return tuple(rows[n] for n in names)

    # -- feature views -------------------------------------------------------------------------
    def apply_view(self, v: FeatureView, principal: str) -> tuple[FeatureView, str]:
        validate_view(v)
        spec = _view_definition(v)
        digest = schema_hash(spec)
        now = utc_now()
        with self.db.session() as c:
            ents = self._entities(c, list(spec.entities))
            keys = {e.join_key for e in ents}
            for i, f in enumerate(spec.features):
                if f.name in keys:
                    raise InvalidArgument(f"feature_view.features[{i}].name", f"'{f.name}' is a join key")
            head = c.execute(select(t.feature_view_heads.c.version).where(
                t.feature_view_heads.c.name == spec.name)).scalar_one_or_none()
            current = None if head is None else c.execute(select(t.feature_views).where(
                t.feature_views.c.name == spec.name, t.feature_views.c.version == head)).one()
            if current is not None and current.schema_hash == digest:
                old = view_from_json(current.spec)
                spec = replace(spec, version=old.version, created_by=old.created_by, create_time=old.create_time)
                # Compared in stored form (as the serialized messages were): NaN equals NaN there.
                if view_json(replace(spec, update_time=old.update_time)) == view_json(old):
                    return old, "UNCHANGED"
                spec = replace(spec, update_time=now)
                c.execute(update(t.feature_views).where(t.feature_views.c.name == spec.name,
                                                        t.feature_views.c.version == old.version)
                          .values(spec=view_json(spec), update_time=now))
                self._write_head(c, spec, ents, new=False)
                return spec, "UPDATED"
            spec = replace(spec, version=(head or 0) + 1, created_by=principal, create_time=now, update_time=now)
            try:
                c.execute(insert(t.feature_views).values(
                    name=spec.name, version=spec.version, spec=view_json(spec), schema_hash=digest,
                    created_by=principal, create_time=now, update_time=now))
            except IntegrityError:
                raise InvalidArgument("feature_view", f"featureViews/{spec.name} changed concurrently; retry") from None
            self._write_head(c, spec, ents, new=head is None)
        return spec, "CREATED" if head is None else "NEW_VERSION"

    @staticmethod
    def _write_head(c, spec: FeatureView, ents, *, new: bool) -> None:  # noqa: ANN001
        text = " ".join([spec.name, spec.description, *(f"{f.name} {f.description}" for f in spec.features)]).lower()
        values = {"version": spec.version, "owner": spec.owner, "tags": dict(spec.tags),
                  "entity_list": "," + ",".join(e.name for e in ents) + ",", "search_text": text}
        if new:
            c.execute(insert(t.feature_view_heads).values(name=spec.name, **values))
        else:
            c.execute(update(t.feature_view_heads).where(t.feature_view_heads.c.name == spec.name).values(**values))
        c.execute(t.view_tags.delete().where(t.view_tags.c.name == spec.name))
        if spec.tags:
            c.execute(insert(t.view_tags), [{"name": spec.name, "key": k, "value": val} for k, val in spec.tags.items()])

    def get_view(self, name: str, version: int = 0) -> ViewDef:
        with self.db.read() as c:
            if not version:
                version = c.execute(select(t.feature_view_heads.c.version).where(
                    t.feature_view_heads.c.name == name)).scalar_one_or_none() or 0
            row = c.execute(select(t.feature_views.c.spec).where(
                t.feature_views.c.name == name, t.feature_views.c.version == version)).scalar_one_or_none()
            if row is None:
                raise NotFound(f"featureViews/{quote(name, bare=True)}" + (f"/versions/{version}" if version else "")
                               + " not found")
            spec = view_from_json(row)
            return ViewDef(spec, self._entities(c, list(spec.entities)))

    def versions(self, name: str, size: int = 0, token: str = "") -> tuple[list[FeatureView], str]:
        """One page of a view's versions, newest first, and the next page's token."""
        page = PageRequest.parse("ListFeatureViewVersions", size, token, {"name": name}, key=int)
        v = t.feature_views.c
        stmt = select(v.version, v.spec).where(v.name == name).order_by(v.version.desc()).limit(page.limit)
        if page.after is not None:
            stmt = stmt.where(v.version < page.after)
        with self.db.read() as c:
            rows, next_token = page.cut(c.execute(stmt).all(), lambda r: r.version)
            if not rows and not c.execute(select(t.feature_view_heads.c.name).where(
                    t.feature_view_heads.c.name == name)).first():
                raise NotFound(f"featureViews/{quote(name, bare=True)} not found")
        return [view_from_json(r.spec) for r in rows], next_token

    # -- feature sets --------------------------------------------------------------------------
    def apply_feature_set(self, fs: FeatureSet) -> tuple[FeatureSet, str]:
        """Create or update a set; every reference must name a current view and one of its
        features. Returns the stored set and CREATED, UPDATED or UNCHANGED."""
        if not NAME_RE.match(fs.name):
            raise InvalidArgument("feature_set.name", f"{quote(fs.name)} is not a valid name ([a-z0-9][a-z0-9_]{{0,62}})")
        if not fs.features:
            raise InvalidArgument("feature_set.features", "at least one feature reference is required")
        refs = parse_refs(fs.features, "feature_set.features")
        seen: set[str] = set()
        for i, ref in enumerate(fs.features):
            if ref in seen:
                raise InvalidArgument(f"feature_set.features[{i}]", f"{quote(ref)} is listed twice")
            seen.add(ref)
        for ref, value in fs.defaults.items():
            if ref not in seen:
                raise InvalidArgument(f"feature_set.defaults[{quote(ref, bare=True)}]",
                                      f"{quote(ref)} is not one of the set's features")
            if not math.isfinite(value):
                raise InvalidArgument(f"feature_set.defaults[{quote(ref, bare=True)}]", "a default must be finite")
        spec = _set_definition(replace(fs, features=tuple(fs.features), tags=dict(fs.tags),
                                       defaults={k: float(v) for k, v in fs.defaults.items()}))
        features: dict[str, dict[str, DataType]] = {}  # view -> its features' types (current version)
        for i, (view, feature) in enumerate(refs):
            if view not in features:
                try:
                    features[view] = {f.name: f.dtype for f in self.get_view(view).spec.features}
                except NotFound as e:
                    raise NotFound(f"{e} (feature_set.features[{i}])") from None
            if feature not in features[view]:
                raise InvalidArgument(f"feature_set.features[{i}]", f"view {quote(view)} has no feature {quote(feature)}")
            if fs.features[i] in fs.defaults and features[view][feature] == DataType.STRING:
                raise InvalidArgument(f"feature_set.defaults[{quote(fs.features[i], bare=True)}]",
                                      "defaults are numbers; this feature is a STRING")
        now = utc_now()
        with self.db.session() as c:
            row = c.execute(select(t.feature_sets.c.spec).where(t.feature_sets.c.name == fs.name)).scalar_one_or_none()
            if row is None:
                spec = replace(spec, create_time=now, update_time=now)
                c.execute(insert(t.feature_sets).values(name=fs.name, spec=feature_set_json(spec),
                                                        create_time=now, update_time=now))
                return spec, "CREATED"
            old = feature_set_from_json(row)
            if feature_set_json(_set_definition(old)) == feature_set_json(spec):
                return old, "UNCHANGED"
            spec = replace(spec, create_time=old.create_time, update_time=now)
            c.execute(update(t.feature_sets).where(t.feature_sets.c.name == fs.name)
                      .values(spec=feature_set_json(spec), update_time=now))
        return spec, "UPDATED"

    def get_feature_set(self, name: str) -> FeatureSet:
        with self.db.read() as c:
            row = c.execute(select(t.feature_sets.c.spec).where(t.feature_sets.c.name == name)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"featureSets/{quote(name, bare=True)} not found")
        return feature_set_from_json(row)

    def feature_sets(self, size: int = 0, token: str = "") -> tuple[list[FeatureSet], str]:
        """One page of feature sets by name, and the next page's token."""
        page = PageRequest.parse("ListFeatureSets", size, token, key=str)
        s = t.feature_sets.c
        stmt = select(s.name, s.spec).order_by(s.name).limit(page.limit)
        if page.after is not None:
            stmt = stmt.where(s.name > page.after)
        with self.db.read() as c:
            rows, next_token = page.cut(c.execute(stmt).all(), lambda r: r.name)
        return [feature_set_from_json(r.spec) for r in rows], next_token

    def list_views(self, *, query: str = "", tag: str = "", owner: str = "", entity: str = "", size: int = 0,
                   token: str = "") -> tuple[list[FeatureView], str]:
        """One page of `search` (current versions by name), and the next page's token."""
        page = PageRequest.parse("ListFeatureViews", size, token,
                                 {"query": query, "tag": tag, "owner": owner, "entity": entity}, key=str)
        views = self.search(query=query, tag=tag, owner=owner, entity=entity, page_size=page.limit,
                            after=page.after or "")
        return page.cut(views, lambda v: v.name)

    def search(self, *, query: str = "", tag: str = "", owner: str = "", entity: str = "", page_size: int = 50,
               after: str = "") -> list[FeatureView]:
        for value, field in ((query, "query"), (tag, "tag"), (owner, "owner"), (entity, "entity")):
            check_filter(value, field)
        h = t.feature_view_heads
        cond = [h.c.name > after]
        if query:
            cond.append(h.c.search_text.contains(query.lower(), autoescape=True))
        if owner:
            cond.append(h.c.owner == owner)
        if entity:
            cond.append(h.c.entity_list.contains(f",{entity},", autoescape=True))
        stmt = select(t.feature_views.c.spec).select_from(h.join(t.feature_views, and_(
            t.feature_views.c.name == h.c.name, t.feature_views.c.version == h.c.version)))
        if tag:
            key, sep, value = tag.partition("=")
            tag_cond = [t.view_tags.c.name == h.c.name, t.view_tags.c.key == key]
            if sep:
                tag_cond.append(t.view_tags.c.value == value)
            stmt = stmt.where(select(t.view_tags.c.name).where(*tag_cond).exists())
        with self.db.read() as c:
            rows = c.execute(stmt.where(*cond).order_by(h.c.name).limit(page_size)).scalars().all()
        return [view_from_json(r) for r in rows]
