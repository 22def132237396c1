"""Reading entities out of the registry's tables: one lookup per kind, and rows -> entities for
a whole page in a fixed number of queries. Every part reads through these.

Lookups see committed versions only unless include_pending: a draft exists for its own upload
flow (and delete), nothing else, so no caller can expose one by mistake."""

from __future__ import annotations

from sqlalchemy import Connection, Row, func, select

from services.common.artifacts import ArtifactStore
from services.common.errors import InvalidArgument, NotFound, quote
from services.registry import tables as T
from services.registry.onnx_check import Signature

from .entities import STATUS_READY, Lineage, Model, Promotion, Upload, Version, as_utc


# -- models ----------------------------------------------------------------------------------
def model_id(s: Connection, name: str) -> int:
    mid = s.execute(select(T.registered_models.c.id).where(T.registered_models.c.name == name)).scalar()
    if mid is None:
        raise NotFound(f"model {name!r} not found")
    return mid


def load_model(s: Connection, name: str) -> Model:
    row = s.execute(select(T.registered_models).where(T.registered_models.c.name == name)).first()
    if row is None:
        raise NotFound(f"model {name!r} not found")
    return models_from_rows(s, [row])[0]


def models_from_rows(s: Connection, rows: list[Row]) -> list[Model]:
    """Tags, aliases and latest committed versions for a whole page in three queries (never
    one per model). latest_version is computed, not stored: it is always a version Get can
    return, whatever was deleted or never committed."""
    ids = [r.id for r in rows]
    tags: dict[int, dict[str, str]] = {i: {} for i in ids}
    aliases: dict[int, dict[str, int]] = {i: {} for i in ids}
    latest: dict[int, int] = {}
    if ids:
        v = T.model_versions.c
        latest = dict(s.execute(select(v.model_id, func.max(v.version)).where(
            v.model_id.in_(ids), v.status == STATUS_READY).group_by(v.model_id)).all())
        for mid, k, v in s.execute(select(T.model_tags.c.model_id, T.model_tags.c.key, T.model_tags.c.value)
                                   .where(T.model_tags.c.model_id.in_(ids))):
            tags[mid][k] = v
        for mid, alias, ver in s.execute(
                select(T.aliases.c.model_id, T.aliases.c.alias, T.model_versions.c.version)
                .join(T.model_versions, T.aliases.c.version_id == T.model_versions.c.id)
                .where(T.aliases.c.model_id.in_(ids))):
            aliases[mid][alias] = ver
    return [Model(name=r.name, description=r.description, owner=r.owner, tags=tags[r.id],
                  latest_version=latest.get(r.id, 0), aliases=aliases[r.id],
                  create_time=as_utc(r.create_time), update_time=as_utc(r.update_time)) for r in rows]


# -- versions --------------------------------------------------------------------------------
def version_row(s: Connection, name: str, version: int, *, include_pending: bool = False) -> Row:
    mid = model_id(s, name)
    v = T.model_versions.c
    stmt = select(T.model_versions).where(v.model_id == mid, v.version == version)
    if not include_pending:
        stmt = stmt.where(v.status == STATUS_READY)
    row = s.execute(stmt).first()
    if row is None:
        raise NotFound(f"version {version} of model {name!r} not found")
    return row


def load_version(s: Connection, store: ArtifactStore, name: str, version: int, *,
                 include_pending: bool = False) -> Version:
    v = T.model_versions.c
    stmt = (select(T.model_versions, T.registered_models.c.name)
            .join(T.registered_models, v.model_id == T.registered_models.c.id)
            .where(T.registered_models.c.name == name, v.version == version))
    if not include_pending:
        stmt = stmt.where(v.status == STATUS_READY)
    row = s.execute(stmt).first()
    if row is None:
        model_id(s, name)  # NOT_FOUND names the model when that is what is missing
        raise NotFound(f"version {version} of model {name!r} not found")
    return versions_from_rows(s, store, [row])[0]


def versions_from_rows(s: Connection, store: ArtifactStore, rows: list[Row]) -> list[Version]:
    ids = [r.id for r in rows]
    aliases: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        for vid, alias in s.execute(select(T.aliases.c.version_id, T.aliases.c.alias)
                                    .where(T.aliases.c.version_id.in_(ids)).order_by(T.aliases.c.alias)):
            aliases[vid].append(alias)
    return [Version(
        name=r.name, version=r.version, framework=r.framework, status=r.status, stage=r.stage,
        description=r.description, tags=dict(r.tags), metrics=dict(r.metrics),
        signature=Signature.from_json(r.signature), lineage=Lineage(**r.lineage),
        artifact_key=r.artifact_key, artifact_uri=store.uri(r.artifact_key) if r.artifact_key else "",
        filename=r.filename, size_bytes=r.size_bytes, sha256=r.sha256, aliases=aliases[r.id],
        created_by=r.created_by, create_time=as_utc(r.create_time), update_time=as_utc(r.update_time),
    ) for r in rows]


# -- uploads ---------------------------------------------------------------------------------
def upload_row(s: Connection, upload_id: str) -> Row:
    """The upload with its version's number, framework, status, artifact key and signature."""
    if not upload_id:
        raise InvalidArgument("upload_id", "is required")
    u, v, m = T.uploads.c, T.model_versions.c, T.registered_models.c
    r = s.execute(select(T.uploads, v.version, v.framework, v.status, v.artifact_key, v.signature, m.name)
                  .join(T.model_versions, u.version_id == v.id)
                  .join(T.registered_models, v.model_id == m.id)
                  .where(u.upload_id == upload_id)).first()
    if r is None:
        raise NotFound(f"upload {quote(upload_id)} not found (committed, aborted or expired)")
    return r


def upload_from_row(r: Row) -> Upload:
    return Upload(r.upload_id, r.name, r.version, r.size_bytes, r.received_bytes, r.sha256, r.filename)


# -- promotions ------------------------------------------------------------------------------
def load_promotion(s: Connection, promotion_id: str) -> Promotion:
    p, m = T.promotions.c, T.registered_models.c
    r = s.execute(select(T.promotions, m.name).join(T.registered_models, p.model_id == m.id)
                  .where(p.promotion_id == promotion_id)).first()
    if r is None:
        raise NotFound(f"promotion {quote(promotion_id)} not found")
    return promotion_from_row(r)


def promotion_from_row(r: Row) -> Promotion:
    return Promotion(r.promotion_id, r.name, r.version, r.alias, r.state, r.requested_by, r.reason,
                     r.decided_by, r.decision_comment, as_utc(r.request_time), as_utc(r.decision_time))
