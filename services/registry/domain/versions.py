"""Model versions: registration (a numbered draft), get, list, update, delete, stage changes
and reading a version's artifact.

Registration is atomic for readers: CreateModelVersion issues the next number (monotonic,
never reused) to a draft that only its upload flow sees; Get, List, aliases, promotions and
the model's latest_version see a version only once its artifact has committed (READY). A
registration that fails (missing file, bad ONNX, sha256 mismatch, abort) leaves nothing
visible; its number stays unused. (The draft is made READY by the upload's commit, in
uploads.py; the lookups in rows.py hide drafts.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy import delete, insert, select, update

from services.common.artifacts import ArtifactNotFound, ArtifactStore
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from services.common.idempotency import RequestIds, check_request_id
from services.common.paging import PageRequest
from services.registry import tables as T
from services.registry.onnx_check import Signature

from .checks import check_name, check_tags, check_text, check_version
from .entities import (
    FRAMEWORKS, STAGE_ARCHIVED, STAGE_NONE, STAGE_PRODUCTION, STAGE_STAGING, STATUS_PENDING_UPLOAD,
    STATUS_READY, Lineage, Version, utc_now,
)
from .rows import load_version, model_id, version_row, versions_from_rows
from .uploads import discard_upload_files

_request_ids = RequestIds(T.idempotency_keys)


def _lineage_payload(lineage: Lineage) -> dict:
    """The lineage as CreateModelVersion's idempotency payload digests it: `features` only when
    given, so a request stored before the field existed still reads as the same request."""
    d = dict(lineage.__dict__)
    if not d["features"]:
        del d["features"]
    return d


class Versions:
    def __init__(self, db: Database, store: ArtifactStore) -> None:
        self.db = db
        self.store = store

    def create_version(self, name: str, *, framework: str, principal: str, description: str = "",
                       tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
                       lineage: Lineage | None = None, signature: Signature | None = None,
                       request_id: str = "") -> Version:
        check_name(name)
        if framework not in FRAMEWORKS:
            raise InvalidArgument("framework", f"{quote(framework, 40)} is not one of {', '.join(FRAMEWORKS)}")
        check_text(description, "description")
        tags = check_tags(tags or {})
        metrics = dict(metrics or {})
        for k, v in metrics.items():
            if not k or len(k) > 128 or v != v:  # NaN never equals itself
                raise InvalidArgument(f"metrics[{quote(k)}]", "metric names are 1-128 characters, values not NaN")
        lineage = lineage or Lineage()
        for i, fv in enumerate(lineage.feature_views):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+:\d+", fv):
                raise InvalidArgument(f"lineage.feature_views[{i}]", f"{quote(fv)} is not 'name:version'")
        for i, ref in enumerate(lineage.features):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+", ref):
                raise InvalidArgument(f"lineage.features[{i}]", f"{quote(ref)} is not 'view:feature'")
        check_request_id(request_id)
        payload = {"name": name, "framework": framework, "description": description, "tags": tags,
                   "metrics": metrics, "lineage": _lineage_payload(lineage),
                   "signature": (signature or Signature()).to_json()}
        with self.db.session() as s:
            prior = _request_ids.lookup(s, principal, "CreateModelVersion", request_id, payload)
            if prior is not None:  # the same draft (to resume its upload) or the committed version
                pname, pver = prior.rsplit("/", 1)
                return load_version(s, self.store, pname, int(pver), include_pending=True)
            mid = model_id(s, name)
            # One UPDATE ... RETURNING takes the row lock and bumps the counter: version numbers
            # are monotonic and never reused, even under concurrent creates, after deletes or
            # after registrations that never committed.
            m = T.registered_models.c
            version = s.execute(update(T.registered_models).where(m.id == mid).values(
                last_issued_version=m.last_issued_version + 1, update_time=utc_now())
                .returning(m.last_issued_version)).scalar_one()
            now = utc_now()
            s.execute(insert(T.model_versions).values(
                model_id=mid, version=version, framework=framework, status=STATUS_PENDING_UPLOAD,
                stage=STAGE_NONE, description=description, tags=tags, metrics=metrics,
                signature=(signature or Signature()).to_json(), lineage=lineage.__dict__,
                created_by=principal, create_time=now, update_time=now))
            _request_ids.remember(s, principal, "CreateModelVersion", request_id, payload, f"{name}/{version}")
            return load_version(s, self.store, name, version, include_pending=True)

    def get_version(self, name: str, version: int) -> Version:
        """A committed version; NotFound for a number that has not committed (yet)."""
        check_name(name)
        check_version(version)
        with self.db.read() as s:
            return load_version(s, self.store, name, version)

    def list_versions(self, name: str, *, stage: int = 0, status: int = 0, size: int = 0,
                      token: str = "") -> tuple[list[Version], str]:
        """Committed versions, newest first (so a status filter other than READY matches none)."""
        page = PageRequest.parse("ListModelVersions", size, token, {"name": name, "stage": stage, "status": status},
                                 key=int)
        v, m = T.model_versions.c, T.registered_models.c
        stmt = (select(T.model_versions, m.name).join(T.registered_models, v.model_id == m.id)
                .where(v.status == STATUS_READY).order_by(v.id.desc()).limit(page.limit))
        with self.db.read() as s:
            if name != "-":
                check_name(name)
                stmt = stmt.where(v.model_id == model_id(s, name))
            if stage:
                stmt = stmt.where(v.stage == stage)
            if status:
                stmt = stmt.where(v.status == status)
            if page.after is not None:
                stmt = stmt.where(v.id < page.after)
            rows, next_token = page.cut(s.execute(stmt).all(), lambda r: r.id)
            versions = versions_from_rows(s, self.store, rows)
        return versions, next_token

    def update_version(self, name: str, version: int, fields: set[str], *, description: str = "",
                       tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None) -> Version:
        check_name(name, "model_version.name")
        check_version(version, "model_version.version")
        unknown = fields - {"description", "tags", "metrics"}
        if not fields or unknown:
            raise InvalidArgument("update_mask", f"paths must be among description, tags, metrics; got "
                                                 f"{sorted(unknown) or 'none'}")
        values: dict[str, Any] = {"update_time": utc_now()}
        if "description" in fields:
            values["description"] = check_text(description, "model_version.description")
        if "tags" in fields:
            values["tags"] = check_tags(tags or {}, "model_version.tags")
        if "metrics" in fields:
            values["metrics"] = dict(metrics or {})
        with self.db.session() as s:
            vid = version_row(s, name, version).id
            s.execute(update(T.model_versions).where(T.model_versions.c.id == vid).values(**values))
            return load_version(s, self.store, name, version)

    def delete_version(self, name: str, version: int) -> None:
        """Deletes a committed version, or a draft (so a client can drop its own failed one)."""
        check_name(name)
        check_version(version)
        with self.db.session() as s:
            row = version_row(s, name, version, include_pending=True)
            held = s.execute(select(T.aliases.c.alias).where(T.aliases.c.version_id == row.id)).scalars().all()
            if held:
                raise FailedPrecondition(f"version {version} of {name!r} is aliased as {sorted(held)}; "
                                         "move or delete the aliases first")
            uploads = s.execute(select(T.uploads.c.upload_id, T.uploads.c.publish_key)
                                .where(T.uploads.c.version_id == row.id)).all()
            s.execute(delete(T.model_versions).where(T.model_versions.c.id == row.id))
        if row.artifact_key:
            self.store.delete(row.artifact_key)
        discard_upload_files(self.store, uploads)

    def transition_stage(self, name: str, version: int, stage: int) -> Version:
        check_name(name)
        check_version(version)
        if stage == STAGE_PRODUCTION:
            raise FailedPrecondition("PRODUCTION is reached only through an approved promotion "
                                     "(RequestPromotion, then ApprovePromotion by an approver)")
        if stage not in (STAGE_NONE, STAGE_STAGING, STAGE_ARCHIVED):
            raise InvalidArgument("stage", f"unknown stage {stage}")
        with self.db.session() as s:
            vid = version_row(s, name, version).id
            s.execute(update(T.model_versions).where(T.model_versions.c.id == vid).values(
                stage=stage, update_time=utc_now()))
            return load_version(s, self.store, name, version)

    def read_artifact(self, name: str, version: int, chunk_size: int = 1 << 20) -> tuple[Version, Iterator[bytes]]:
        v = self.get_version(name, version)  # committed only: a draft is NotFound
        try:
            return v, self.store.open_read(v.artifact_key, chunk_size)
        except ArtifactNotFound:
            raise NotFound(f"artifact of {name!r} version {version} is missing from the store") from None
