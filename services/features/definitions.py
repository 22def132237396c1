"""Feature definitions: entities and versioned feature views, with search.

A view's schema -- its entities, features and their types, ttl and source -- decides its
version: applying a different schema creates version N+1 and keeps N readable (training sets
and online rows name the version they were built with); applying new description, owner, tags or
validation rules updates the current version in place; applying the same definition is a no-op.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from sqlalchemy import and_, insert, select, update
from sqlalchemy.exc import IntegrityError
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as pb

from services.common.db import Database
from services.common.errors import InvalidArgument, NotFound, quote
from services.common.limits import check_filter
from services.common.paging import PageRequest
from services.common.timeutil import utc_now
from services.features import tables as t

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_]{0,62}\Z")
_DT = types_pb2.DataType
FEATURE_TYPES = {_DT.DATA_TYPE_FLOAT32, _DT.DATA_TYPE_FLOAT64, _DT.DATA_TYPE_INT32, _DT.DATA_TYPE_INT64,
                 _DT.DATA_TYPE_BOOL, _DT.DATA_TYPE_STRING}
NUMERIC_TYPES = {_DT.DATA_TYPE_FLOAT32, _DT.DATA_TYPE_FLOAT64, _DT.DATA_TYPE_INT32, _DT.DATA_TYPE_INT64}


@dataclass(frozen=True)
class ViewDef:
    """A view version with its entities resolved (what readers and writers need)."""

    spec: pb.FeatureView
    entities: tuple[pb.Entity, ...]

    @property
    def join_keys(self) -> tuple[str, ...]:
        return tuple(e.join_key for e in self.entities)


def parse_refs(refs: list[str], field: str = "features") -> list[tuple[str, str]]:
    """Feature references "view:feature" as (view, feature); INVALID_ARGUMENT names the bad one."""
    out = []
    for i, ref in enumerate(refs):
        view, sep, feature = ref.partition(":")
        if not sep or not view or not feature:
            raise InvalidArgument(f"{field}[{i}]", f"{quote(ref)} is not a feature reference (view:feature)")
        out.append((view, feature))
    return out


def one_feature_list(request: pb.GetOnlineFeaturesRequest | pb.GetHistoricalFeaturesRequest) -> None:
    """A read names its features or a feature set, not both (INVALID_ARGUMENT naming feature_set)."""
    if request.feature_set and request.features:
        raise InvalidArgument("feature_set", "give features or feature_set, not both")


def _set_definition(fs: pb.FeatureSet) -> pb.FeatureSet:
    """A copy of the set without its timestamps: what an apply compares."""
    out = pb.FeatureSet()
    out.CopyFrom(fs)
    out.ClearField("create_time")
    out.ClearField("update_time")
    return out


def schema_hash(v: pb.FeatureView) -> str:
    """What makes a new version: entities, features with types, ttl, source."""
    schema = pb.FeatureView(entities=v.entities, ttl_seconds=v.ttl_seconds, source=v.source,
                            features=[pb.Feature(name=f.name, dtype=f.dtype) for f in v.features])
    return hashlib.sha256(schema.SerializeToString(deterministic=True)).hexdigest()


def validate_view(v: pb.FeatureView) -> None:
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
        if r.allowed_values and f.dtype != _DT.DATA_TYPE_STRING:
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
    def apply_entity(self, e: pb.Entity) -> pb.Entity:
        if not NAME_RE.match(e.name):
            raise InvalidArgument("entity.name", f"{quote(e.name)} is not a valid name ([a-z0-9][a-z0-9_]{{0,62}})")
        if e.value_type not in (pb.VALUE_TYPE_INT64, pb.VALUE_TYPE_STRING):
            raise InvalidArgument("entity.value_type", "must be VALUE_TYPE_INT64 or VALUE_TYPE_STRING")
        spec = pb.Entity()
        spec.CopyFrom(e)
        spec.join_key = e.join_key or e.name
        if not NAME_RE.match(spec.join_key):
            raise InvalidArgument("entity.join_key", f"{quote(spec.join_key)} is not a valid column name")
        now = utc_now()
        with self.db.session() as c:
            row = c.execute(select(t.entities).where(t.entities.c.name == e.name)).one_or_none()
            if row is None:
                spec.create_time.FromDatetime(now)
                c.execute(insert(t.entities).values(name=e.name, spec=spec.SerializeToString(), create_time=now,
                                                    update_time=now))
                return spec
            old = pb.Entity.FromString(row.spec)
            if (old.join_key, old.value_type) != (spec.join_key, spec.value_type):
                raise InvalidArgument("entity", f"entity '{e.name}' exists with join key {old.join_key} "
                                      f"({pb.ValueType.Name(old.value_type)}); they cannot change")
            spec.create_time.CopyFrom(old.create_time)
            c.execute(update(t.entities).where(t.entities.c.name == e.name)
                      .values(spec=spec.SerializeToString(), update_time=now))
        return spec

    def entities(self, size: int = 0, token: str = "") -> tuple[list[pb.Entity], str]:
        """One page of entities by name, and the next page's token (services/common/paging.py)."""
        page = PageRequest.parse("ListEntities", size, token, key=str)
        stmt = select(t.entities).order_by(t.entities.c.name).limit(page.limit)
        if page.after is not None:
            stmt = stmt.where(t.entities.c.name > page.after)
        with self.db.read() as c:
            rows, next_token = page.cut(c.execute(stmt).all(), lambda r: r.name)
        return [pb.Entity.FromString(r.spec) for r in rows], next_token

    def _entities(self, c, names) -> tuple[pb.Entity, ...]:  # noqa: ANN001
        rows = {r.name: pb.Entity.FromString(r.spec) for r in
                c.execute(select(t.entities).where(t.entities.c.name.in_(list(names))))}
        for i, n in enumerate(names):
            if n not in rows:
                raise NotFound(f"entities/{quote(n, bare=True)} not found (feature_view.entities[{i}]); "
                               "apply the entity first")
        return tuple(rows[n] for n in names)

    # -- feature views -------------------------------------------------------------------------
    def apply_view(self, v: pb.FeatureView, principal: str) -> tuple[pb.FeatureView, str]:
        validate_view(v)
        spec = pb.FeatureView()
        spec.CopyFrom(v)
        spec.ClearField("create_time")
        spec.ClearField("update_time")
        spec.version = 0
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
                old = pb.FeatureView.FromString(current.spec)
                spec.version, spec.created_by = old.version, old.created_by
                spec.create_time.CopyFrom(old.create_time)
                same = pb.FeatureView()
                same.CopyFrom(spec)
                same.update_time.CopyFrom(old.update_time)
                if same.SerializeToString(deterministic=True) == old.SerializeToString(deterministic=True):
                    return old, "UNCHANGED"
                spec.update_time.FromDatetime(now)
                c.execute(update(t.feature_views).where(t.feature_views.c.name == spec.name,
                                                        t.feature_views.c.version == old.version)
                          .values(spec=spec.SerializeToString(), update_time=now))
                self._write_head(c, spec, ents, new=False)
                return spec, "UPDATED"
            spec.version = (head or 0) + 1
            spec.created_by = principal
            spec.create_time.FromDatetime(now)
            spec.update_time.FromDatetime(now)
            try:
                c.execute(insert(t.feature_views).values(
                    name=spec.name, version=spec.version, spec=spec.SerializeToString(), schema_hash=digest,
                    created_by=principal, create_time=now, update_time=now))
            except IntegrityError:
                raise InvalidArgument("feature_view", f"featureViews/{spec.name} changed concurrently; retry") from None
            self._write_head(c, spec, ents, new=head is None)
        return spec, "CREATED" if head is None else "NEW_VERSION"

    @staticmethod
    def _write_head(c, spec: pb.FeatureView, ents, *, new: bool) -> None:  # noqa: ANN001
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
            spec = pb.FeatureView.FromString(row)
            return ViewDef(spec, self._entities(c, list(spec.entities)))

    def versions(self, name: str, size: int = 0, token: str = "") -> tuple[list[pb.FeatureView], str]:
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
        return [pb.FeatureView.FromString(r.spec) for r in rows], next_token

    # -- feature sets --------------------------------------------------------------------------
    def apply_feature_set(self, fs: pb.FeatureSet) -> tuple[pb.FeatureSet, str]:
        """Create or update a set; every reference must name a current view and one of its
        features. Returns the stored set and CREATED, UPDATED or UNCHANGED."""
        if not NAME_RE.match(fs.name):
            raise InvalidArgument("feature_set.name", f"{quote(fs.name)} is not a valid name ([a-z0-9][a-z0-9_]{{0,62}})")
        if not fs.features:
            raise InvalidArgument("feature_set.features", "at least one feature reference is required")
        refs = parse_refs(list(fs.features), "feature_set.features")
        seen: set[str] = set()
        for i, ref in enumerate(fs.features):
            if ref in seen:
                raise InvalidArgument(f"feature_set.features[{i}]", f"{quote(ref)} is listed twice")
            seen.add(ref)
        spec = _set_definition(fs)
        features: dict[str, set[str]] = {}  # view -> its features (current version)
        for i, (view, feature) in enumerate(refs):
            if view not in features:
                try:
                    features[view] = {f.name for f in self.get_view(view).spec.features}
                except NotFound as e:
                    raise NotFound(f"{e} (feature_set.features[{i}])") from None
            if feature not in features[view]:
                raise InvalidArgument(f"feature_set.features[{i}]", f"view {quote(view)} has no feature {quote(feature)}")
        now = utc_now()
        with self.db.session() as c:
            row = c.execute(select(t.feature_sets.c.spec).where(t.feature_sets.c.name == fs.name)).scalar_one_or_none()
            if row is None:
                spec.create_time.FromDatetime(now)
                spec.update_time.FromDatetime(now)
                c.execute(insert(t.feature_sets).values(name=fs.name, spec=spec.SerializeToString(),
                                                        create_time=now, update_time=now))
                return spec, "CREATED"
            old = pb.FeatureSet.FromString(row)
            if _set_definition(old) == spec:
                return old, "UNCHANGED"
            spec.create_time.CopyFrom(old.create_time)
            spec.update_time.FromDatetime(now)
            c.execute(update(t.feature_sets).where(t.feature_sets.c.name == fs.name)
                      .values(spec=spec.SerializeToString(), update_time=now))
        return spec, "UPDATED"

    def get_feature_set(self, name: str) -> pb.FeatureSet:
        with self.db.read() as c:
            row = c.execute(select(t.feature_sets.c.spec).where(t.feature_sets.c.name == name)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"featureSets/{quote(name, bare=True)} not found")
        return pb.FeatureSet.FromString(row)

    def feature_sets(self, size: int = 0, token: str = "") -> tuple[list[pb.FeatureSet], str]:
        """One page of feature sets by name, and the next page's token."""
        page = PageRequest.parse("ListFeatureSets", size, token, key=str)
        s = t.feature_sets.c
        stmt = select(s.name, s.spec).order_by(s.name).limit(page.limit)
        if page.after is not None:
            stmt = stmt.where(s.name > page.after)
        with self.db.read() as c:
            rows, next_token = page.cut(c.execute(stmt).all(), lambda r: r.name)
        return [pb.FeatureSet.FromString(r.spec) for r in rows], next_token

    def list_views(self, *, query: str = "", tag: str = "", owner: str = "", entity: str = "", size: int = 0,
                   token: str = "") -> tuple[list[pb.FeatureView], str]:
        """One page of `search` (current versions by name), and the next page's token."""
        page = PageRequest.parse("ListFeatureViews", size, token,
                                 {"query": query, "tag": tag, "owner": owner, "entity": entity}, key=str)
        views = self.search(query=query, tag=tag, owner=owner, entity=entity, page_size=page.limit,
                            after=page.after or "")
        return page.cut(views, lambda v: v.name)

    def search(self, *, query: str = "", tag: str = "", owner: str = "", entity: str = "", page_size: int = 50,
               after: str = "") -> list[pb.FeatureView]:
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
        return [pb.FeatureView.FromString(r) for r in rows]
