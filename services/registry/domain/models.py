"""Registered models: create (idempotent by request id), get, search, update and delete."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from services.common.artifacts import ArtifactStore
from services.common.db import Database
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, quote
from services.common.idempotency import RequestIds, check_request_id
from services.common.limits import check_filter, check_filters
from services.common.paging import PageRequest
from services.registry import tables as T

from .checks import TAG_KEY_RE, check_name, check_tags, check_text
from .entities import Model, utc_now
from .rows import load_model, model_id, models_from_rows
from .uploads import discard_upload_files

_request_ids = RequestIds(T.idempotency_keys)


class Models:
    def __init__(self, db: Database, store: ArtifactStore) -> None:
        self.db = db
        self.store = store

    def create_model(self, model: Model, principal: str, request_id: str = "") -> Model:
        check_name(model.name, "registered_model.name")
        check_text(model.description, "registered_model.description")
        check_tags(model.tags, "registered_model.tags")
        check_request_id(request_id)
        with self.db.session() as s:
            prior = _request_ids.lookup(s, principal, "CreateRegisteredModel", request_id, model.__dict__)
            if prior is not None:
                return load_model(s, prior)
            if s.execute(select(T.registered_models.c.id).where(T.registered_models.c.name == model.name)).first():
                raise AlreadyExists(f"model {model.name!r} already exists")
            now = utc_now()
            try:
                mid = s.execute(insert(T.registered_models).values(
                    name=model.name, description=model.description, owner=model.owner or principal,
                    last_issued_version=0, create_time=now, update_time=now)).inserted_primary_key[0]
            except IntegrityError:
                raise AlreadyExists(f"model {model.name!r} already exists") from None
            if model.tags:
                s.execute(insert(T.model_tags), [{"model_id": mid, "key": k, "value": v}
                                                 for k, v in model.tags.items()])
            _request_ids.remember(s, principal, "CreateRegisteredModel", request_id, model.__dict__,
                                 model.name)
            return load_model(s, model.name)

    def get_model(self, name: str) -> Model:
        check_name(name)
        with self.db.read() as s:
            return load_model(s, name)

    def list_models(self, *, query: str = "", owner: str = "", tags: list[str] | None = None,
                    size: int = 0, token: str = "") -> tuple[list[Model], str]:
        check_filter(query, "query")
        check_filter(owner, "owner")
        tags = check_filters(tags or [], "tags")
        page = PageRequest.parse("ListRegisteredModels", size, token,
                                 {"query": query, "owner": owner, "tags": sorted(tags)}, key=str)
        m = T.registered_models.c
        stmt = select(T.registered_models).order_by(m.name).limit(page.limit)
        if query:
            like = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            stmt = stmt.where(or_(func.lower(m.name).like(like, escape="\\"),
                                  func.lower(m.description).like(like, escape="\\")))
        if owner:
            stmt = stmt.where(m.owner == owner)
        for i, tag in enumerate(tags):
            key, eq, value = tag.partition("=")
            if not TAG_KEY_RE.match(key):
                raise InvalidArgument(f"tags[{i}]", f"{quote(tag)} is not 'key' or 'key=value'")
            cond = and_(T.model_tags.c.model_id == m.id, T.model_tags.c.key == key)
            if eq:
                cond = and_(cond, T.model_tags.c.value == value)
            stmt = stmt.where(exists().where(cond))
        if page.after is not None:
            stmt = stmt.where(m.name > page.after)
        with self.db.read() as s:
            rows, next_token = page.cut(s.execute(stmt).all(), lambda r: r.name)
            models = models_from_rows(s, rows)
        return models, next_token

    def update_model(self, name: str, fields: set[str], description: str = "", owner: str = "",
                     tags: dict[str, str] | None = None) -> Model:
        check_name(name, "registered_model.name")
        unknown = fields - {"description", "owner", "tags"}
        if not fields or unknown:
            raise InvalidArgument("update_mask", f"paths must be among description, owner, tags; got "
                                                 f"{sorted(unknown) or 'none'}")
        with self.db.session() as s:
            mid = model_id(s, name)
            values: dict[str, Any] = {"update_time": utc_now()}
            if "description" in fields:
                values["description"] = check_text(description, "registered_model.description")
            if "owner" in fields:
                values["owner"] = check_text(owner, "registered_model.owner", 256)
            s.execute(update(T.registered_models).where(T.registered_models.c.id == mid).values(**values))
            if "tags" in fields:
                check_tags(tags or {}, "registered_model.tags")
                s.execute(delete(T.model_tags).where(T.model_tags.c.model_id == mid))
                if tags:
                    s.execute(insert(T.model_tags), [{"model_id": mid, "key": k, "value": v}
                                                     for k, v in tags.items()])
            return load_model(s, name)

    def delete_model(self, name: str) -> None:
        check_name(name)
        with self.db.session() as s:
            mid = model_id(s, name)
            held = s.execute(select(T.aliases.c.alias).where(T.aliases.c.model_id == mid)).scalars().all()
            if held:
                raise FailedPrecondition(f"model {name!r} still has aliases {sorted(held)}; delete them first")
            keys = s.execute(select(T.model_versions.c.artifact_key).where(
                T.model_versions.c.model_id == mid, T.model_versions.c.artifact_key != "")).scalars().all()
            uploads = s.execute(select(T.uploads.c.upload_id, T.uploads.c.publish_key).join(
                T.model_versions, T.uploads.c.version_id == T.model_versions.c.id).where(
                T.model_versions.c.model_id == mid)).all()
            s.execute(delete(T.registered_models).where(T.registered_models.c.id == mid))
        # Files go after the rows: a crash in between leaves unreferenced files, never rows
        # pointing at missing files.
        for key in keys:
            self.store.delete(key)
        discard_upload_files(self.store, uploads)
