"""The model registry's domain logic: plain Python over SQLAlchemy and the artifact store.
Nothing here knows about protobuf or gRPC; server.py translates.

Registration is atomic for readers: CreateModelVersion issues the next number (monotonic,
never reused) to a draft that only its upload flow sees; Get, List, aliases, promotions and
the model's latest_version see a version only once its artifact has committed (READY). A
registration that fails (missing file, bad ONNX, sha256 mismatch, abort) leaves nothing
visible; its number stays unused.

Crash safety of artifacts (see services/common/artifacts/base.py for the store's half):
- chunk bytes are staged under the upload id and become visible only through `publish`;
- the key to publish is written to the upload row before publishing, and the version row
  points at the key only after publishing, in one transaction;
- a commit that dies before recording is finished by committing the upload again: from the
  staged bytes when the publish had not completed, from the published object (whole, since
  publishing is atomic) when it had; `recover()` (run at start-up) removes what an interrupted
  publish left beside the key, and only uploads idle past `stale_upload_after` are dropped.
So a version never points at a missing or partial file, whatever moment the process dies, and
acknowledged chunks survive a crash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from services.common.artifacts import ArtifactNotFound, ArtifactStore
from services.common.db import Database
from services.common.errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, quote,
)
from services.common.limits import MAX_VERSION, check_filter, check_filters
from services.registry import tables as T
from services.registry.onnx_check import Signature, validate_onnx

# Enum values mirror strata.registry.v1 (kept as ints so the domain needs no protobuf).
STATUS_PENDING_UPLOAD, STATUS_READY = 1, 2
STAGE_NONE, STAGE_STAGING, STAGE_PRODUCTION, STAGE_ARCHIVED = 0, 1, 2, 3
PROMOTION_PENDING, PROMOTION_APPROVED, PROMOTION_REJECTED = 1, 2, 3

FRAMEWORKS = ("onnx", "sklearn", "xgboost", "lightgbm", "pytorch", "other")
MAX_CHUNK_BYTES = 8 << 20
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}\Z")
_SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")
_FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}\Z")


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(t: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; everything stored is UTC.
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


# -- entities --------------------------------------------------------------------------------
@dataclass
class Model:
    name: str
    description: str = ""
    owner: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    latest_version: int = 0  # highest committed (READY) version; 0 when none
    aliases: dict[str, int] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass
class Lineage:
    mlflow_run_id: str = ""
    training_job_id: str = ""
    feature_views: list[str] = field(default_factory=list)
    dataset_hash: str = ""
    dataset_uri: str = ""


@dataclass
class Version:
    name: str
    version: int
    framework: str
    status: int
    stage: int = STAGE_NONE
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    signature: Signature = field(default_factory=Signature)
    lineage: Lineage = field(default_factory=Lineage)
    artifact_key: str = ""
    artifact_uri: str = ""
    filename: str = ""
    size_bytes: int = 0
    sha256: str = ""
    aliases: list[str] = field(default_factory=list)
    created_by: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass
class Upload:
    upload_id: str
    name: str
    version: int
    size_bytes: int
    received_bytes: int
    sha256: str
    filename: str


@dataclass
class Promotion:
    promotion_id: str
    name: str
    version: int
    alias: str
    state: int
    requested_by: str
    reason: str = ""
    decided_by: str = ""
    decision_comment: str = ""
    request_time: datetime | None = None
    decision_time: datetime | None = None


# -- validation ------------------------------------------------------------------------------
def check_name(name: str, field_name: str = "name") -> str:
    if not name:
        raise InvalidArgument(field_name, "is required")
    if not _NAME_RE.match(name):
        raise InvalidArgument(field_name, f"{quote(name)} is not a valid model name (letters, digits, "
                                          "'.', '_', '-'; 1-128 characters; starts with a letter or digit)")
    return name


def check_version(version: int, field_name: str = "version") -> int:
    if not 0 < version <= MAX_VERSION:  # (int32 in the contract and the database)
        raise InvalidArgument(field_name, f"must be a version number within 1..{MAX_VERSION}, got {version}")
    return version


def check_alias(alias: str, field_name: str = "alias") -> str:
    if not alias:
        raise InvalidArgument(field_name, "is required")
    if not _ALIAS_RE.match(alias):
        raise InvalidArgument(field_name, f"{quote(alias)} is not a valid alias (lower-case letters, digits, "
                                          "'_', '-'; 1-64 characters)")
    if alias == "latest" or re.fullmatch(r"v\d+", alias):
        raise InvalidArgument(field_name, f"{alias!r} is reserved (it would read as a version)")
    return alias


def check_tags(tags: dict[str, str], field_name: str = "tags") -> dict[str, str]:
    for k, v in tags.items():
        if not _TAG_KEY_RE.match(k):
            raise InvalidArgument(f"{field_name}[{quote(k)}]", "tag keys are 1-128 of [A-Za-z0-9_.:/-]")
        if len(v) > 1024:
            raise InvalidArgument(f"{field_name}[{k!r}]", "tag values are at most 1024 characters")
    return dict(tags)


def check_text(value: str, field_name: str, limit: int = 65536) -> str:
    if len(value) > limit:
        raise InvalidArgument(field_name, f"is longer than {limit} characters")
    return value


def check_request_id(request_id: str) -> str:
    if request_id and not _REQUEST_ID_RE.match(request_id):
        raise InvalidArgument("request_id", "must be 1-128 printable ASCII characters without spaces")
    return request_id


class PageToken:
    """Opaque keyset-pagination token, bound to the query that produced it so a token is
    never replayed against a different filter."""

    @staticmethod
    def encode(after: Any, query: dict) -> str:
        raw = json.dumps({"a": after, "q": _hash(query)[:16]}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(token: str, query: dict) -> Any:
        if not token:
            return None
        try:
            d = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            ok = d["q"] == _hash(query)[:16]
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise InvalidArgument("page_token", "is not a token returned by this query")
        return d["a"]


def page_size(n: int) -> int:
    if n < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(n or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# -- the registry ----------------------------------------------------------------------------
@dataclass
class RegistryConfig:
    protected_aliases: frozenset[str] = frozenset({"production", "champion"})
    max_artifact_bytes: int = 20 << 30
    stale_upload_after: timedelta = timedelta(hours=24)


class Registry:
    def __init__(self, db: Database, store: ArtifactStore, config: RegistryConfig | None = None) -> None:
        self.db = db
        self.store = store
        self.config = config or RegistryConfig()
        # Running sha256 per upload, fed as chunks arrive (recomputed from the staged bytes
        # at commit if this process did not see every chunk, e.g. after a restart).
        self._hashers: dict[str, tuple[Any, int]] = {}
        self._upload_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- models ------------------------------------------------------------------------------
    def create_model(self, model: Model, principal: str, request_id: str = "") -> Model:
        check_name(model.name, "registered_model.name")
        check_text(model.description, "registered_model.description")
        check_tags(model.tags, "registered_model.tags")
        check_request_id(request_id)
        with self.db.session() as s:
            prior = self._idempotent(s, principal, "CreateRegisteredModel", request_id, model.__dict__)
            if prior is not None:
                return self._get_model(s, prior)
            if s.execute(select(T.registered_models.c.id).where(T.registered_models.c.name == model.name)).first():
                raise AlreadyExists(f"model {model.name!r} already exists")
            now = _now()
            try:
                mid = s.execute(insert(T.registered_models).values(
                    name=model.name, description=model.description, owner=model.owner or principal,
                    last_issued_version=0, create_time=now, update_time=now)).inserted_primary_key[0]
            except IntegrityError:
                raise AlreadyExists(f"model {model.name!r} already exists") from None
            if model.tags:
                s.execute(insert(T.model_tags), [{"model_id": mid, "key": k, "value": v}
                                                 for k, v in model.tags.items()])
            self._remember(s, principal, "CreateRegisteredModel", request_id, model.__dict__, model.name)
            return self._get_model(s, model.name)

    def get_model(self, name: str) -> Model:
        check_name(name)
        with self.db.read() as s:
            return self._get_model(s, name)

    def list_models(self, *, query: str = "", owner: str = "", tags: list[str] | None = None,
                    size: int = 0, token: str = "") -> tuple[list[Model], str]:
        check_filter(query, "query")
        check_filter(owner, "owner")
        tags = check_filters(tags or [], "tags")
        n = page_size(size)
        q_key = {"query": query, "owner": owner, "tags": sorted(tags)}
        after = PageToken.decode(token, q_key)
        m = T.registered_models.c
        stmt = select(T.registered_models).order_by(m.name).limit(n + 1)
        if query:
            like = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            stmt = stmt.where(or_(func.lower(m.name).like(like, escape="\\"),
                                  func.lower(m.description).like(like, escape="\\")))
        if owner:
            stmt = stmt.where(m.owner == owner)
        for i, tag in enumerate(tags):
            key, eq, value = tag.partition("=")
            if not _TAG_KEY_RE.match(key):
                raise InvalidArgument(f"tags[{i}]", f"{quote(tag)} is not 'key' or 'key=value'")
            cond = and_(T.model_tags.c.model_id == m.id, T.model_tags.c.key == key)
            if eq:
                cond = and_(cond, T.model_tags.c.value == value)
            stmt = stmt.where(exists().where(cond))
        if after is not None:
            stmt = stmt.where(m.name > after)
        with self.db.read() as s:
            rows = s.execute(stmt).all()
            more = len(rows) > n
            rows = rows[:n]
            models = self._models_from_rows(s, rows)
        return models, PageToken.encode(models[-1].name, q_key) if more else ""

    def update_model(self, name: str, fields: set[str], description: str = "", owner: str = "",
                     tags: dict[str, str] | None = None) -> Model:
        check_name(name, "registered_model.name")
        unknown = fields - {"description", "owner", "tags"}
        if not fields or unknown:
            raise InvalidArgument("update_mask", f"paths must be among description, owner, tags; got "
                                                 f"{sorted(unknown) or 'none'}")
        with self.db.session() as s:
            mid = self._model_id(s, name)
            values: dict[str, Any] = {"update_time": _now()}
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
            return self._get_model(s, name)

    def delete_model(self, name: str) -> None:
        check_name(name)
        with self.db.session() as s:
            mid = self._model_id(s, name)
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
        self._discard_upload_files(uploads)

    # -- versions ----------------------------------------------------------------------------
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
        check_request_id(request_id)
        payload = {"name": name, "framework": framework, "description": description, "tags": tags,
                   "metrics": metrics, "lineage": lineage.__dict__,
                   "signature": (signature or Signature()).to_json()}
        with self.db.session() as s:
            prior = self._idempotent(s, principal, "CreateModelVersion", request_id, payload)
            if prior is not None:  # the same draft (to resume its upload) or the committed version
                pname, pver = prior.rsplit("/", 1)
                return self._get_version(s, pname, int(pver), include_pending=True)
            mid = self._model_id(s, name)
            # One UPDATE ... RETURNING takes the row lock and bumps the counter: version numbers
            # are monotonic and never reused, even under concurrent creates, after deletes or
            # after registrations that never committed.
            m = T.registered_models.c
            version = s.execute(update(T.registered_models).where(m.id == mid).values(
                last_issued_version=m.last_issued_version + 1, update_time=_now())
                .returning(m.last_issued_version)).scalar_one()
            now = _now()
            s.execute(insert(T.model_versions).values(
                model_id=mid, version=version, framework=framework, status=STATUS_PENDING_UPLOAD,
                stage=STAGE_NONE, description=description, tags=tags, metrics=metrics,
                signature=(signature or Signature()).to_json(), lineage=lineage.__dict__,
                created_by=principal, create_time=now, update_time=now))
            self._remember(s, principal, "CreateModelVersion", request_id, payload, f"{name}/{version}")
            return self._get_version(s, name, version, include_pending=True)

    def get_version(self, name: str, version: int) -> Version:
        """A committed version; NotFound for a number that has not committed (yet)."""
        check_name(name)
        check_version(version)
        with self.db.read() as s:
            return self._get_version(s, name, version)

    def list_versions(self, name: str, *, stage: int = 0, status: int = 0, size: int = 0,
                      token: str = "") -> tuple[list[Version], str]:
        """Committed versions, newest first (so a status filter other than READY matches none)."""
        n = page_size(size)
        q_key = {"name": name, "stage": stage, "status": status}
        after = PageToken.decode(token, q_key)
        v, m = T.model_versions.c, T.registered_models.c
        stmt = (select(T.model_versions, m.name).join(T.registered_models, v.model_id == m.id)
                .where(v.status == STATUS_READY).order_by(v.id.desc()).limit(n + 1))
        with self.db.read() as s:
            if name != "-":
                check_name(name)
                stmt = stmt.where(v.model_id == self._model_id(s, name))
            if stage:
                stmt = stmt.where(v.stage == stage)
            if status:
                stmt = stmt.where(v.status == status)
            if after is not None:
                stmt = stmt.where(v.id < int(after))
            rows = s.execute(stmt).all()
            more = len(rows) > n
            rows = rows[:n]
            versions = self._versions_from_rows(s, rows)
        return versions, PageToken.encode(rows[-1].id, q_key) if more else ""

    def update_version(self, name: str, version: int, fields: set[str], *, description: str = "",
                       tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None) -> Version:
        check_name(name, "model_version.name")
        check_version(version, "model_version.version")
        unknown = fields - {"description", "tags", "metrics"}
        if not fields or unknown:
            raise InvalidArgument("update_mask", f"paths must be among description, tags, metrics; got "
                                                 f"{sorted(unknown) or 'none'}")
        values: dict[str, Any] = {"update_time": _now()}
        if "description" in fields:
            values["description"] = check_text(description, "model_version.description")
        if "tags" in fields:
            values["tags"] = check_tags(tags or {}, "model_version.tags")
        if "metrics" in fields:
            values["metrics"] = dict(metrics or {})
        with self.db.session() as s:
            vid = self._version_row(s, name, version).id
            s.execute(update(T.model_versions).where(T.model_versions.c.id == vid).values(**values))
            return self._get_version(s, name, version)

    def delete_version(self, name: str, version: int) -> None:
        """Deletes a committed version, or a draft (so a client can drop its own failed one)."""
        check_name(name)
        check_version(version)
        with self.db.session() as s:
            row = self._version_row(s, name, version, include_pending=True)
            held = s.execute(select(T.aliases.c.alias).where(T.aliases.c.version_id == row.id)).scalars().all()
            if held:
                raise FailedPrecondition(f"version {version} of {name!r} is aliased as {sorted(held)}; "
                                         "move or delete the aliases first")
            uploads = s.execute(select(T.uploads.c.upload_id, T.uploads.c.publish_key)
                                .where(T.uploads.c.version_id == row.id)).all()
            s.execute(delete(T.model_versions).where(T.model_versions.c.id == row.id))
        if row.artifact_key:
            self.store.delete(row.artifact_key)
        self._discard_upload_files(uploads)

    def transition_stage(self, name: str, version: int, stage: int) -> Version:
        check_name(name)
        check_version(version)
        if stage == STAGE_PRODUCTION:
            raise FailedPrecondition("PRODUCTION is reached only through an approved promotion "
                                     "(RequestPromotion, then ApprovePromotion by an approver)")
        if stage not in (STAGE_NONE, STAGE_STAGING, STAGE_ARCHIVED):
            raise InvalidArgument("stage", f"unknown stage {stage}")
        with self.db.session() as s:
            vid = self._version_row(s, name, version).id
            s.execute(update(T.model_versions).where(T.model_versions.c.id == vid).values(
                stage=stage, update_time=_now()))
            return self._get_version(s, name, version)

    # -- aliases -----------------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int, principal: str) -> tuple[Version, int]:
        check_name(name)
        check_alias(alias)
        check_version(version)
        if alias in self.config.protected_aliases:
            raise FailedPrecondition(f"alias {alias!r} is protected: it moves only through an approved "
                                     "promotion (RequestPromotion)")
        with self.db.session() as s:
            previous = self._move_alias(s, name, alias, version, principal)
            return self._get_version(s, name, version), previous

    def delete_alias(self, name: str, alias: str) -> None:
        check_name(name)
        check_alias(alias)
        with self.db.session() as s:
            mid = self._model_id(s, name)
            if alias in self.config.protected_aliases:
                raise FailedPrecondition(f"alias {alias!r} is protected: it moves only through an approved "
                                         "promotion")
            gone = s.execute(delete(T.aliases).where(T.aliases.c.model_id == mid, T.aliases.c.alias == alias))
            if gone.rowcount == 0:
                raise NotFound(f"model {name!r} has no alias {alias!r}")

    def get_by_alias(self, name: str, alias: str) -> Version:
        check_name(name)
        check_alias(alias)
        with self.db.read() as s:
            mid = self._model_id(s, name)
            v = s.execute(select(T.model_versions.c.version).join(
                T.aliases, T.aliases.c.version_id == T.model_versions.c.id).where(
                T.aliases.c.model_id == mid, T.aliases.c.alias == alias)).scalar_one_or_none()
            if v is None:
                raise NotFound(f"model {name!r} has no alias {alias!r}")
            return self._get_version(s, name, v)

    def _move_alias(self, s: Connection, name: str, alias: str, version: int, principal: str) -> int:
        row = self._version_row(s, name, version)  # committed only: a draft is NotFound
        a = T.aliases.c
        prev = s.execute(select(T.model_versions.c.version).join(T.aliases, a.version_id == T.model_versions.c.id)
                         .where(a.model_id == row.model_id, a.alias == alias)).scalar_one_or_none()
        values = {"version_id": row.id, "updated_by": principal, "update_time": _now()}
        if prev is None:
            s.execute(insert(T.aliases).values(model_id=row.model_id, alias=alias, **values))
        else:
            s.execute(update(T.aliases).where(a.model_id == row.model_id, a.alias == alias).values(**values))
        return prev or 0

    # -- artifact uploads --------------------------------------------------------------------
    def begin_upload(self, name: str, version: int, *, size_bytes: int, sha256: str, filename: str,
                     principal: str) -> Upload:
        check_name(name)
        check_version(version)
        if size_bytes <= 0:
            raise InvalidArgument("size_bytes", "must be positive")
        if size_bytes > self.config.max_artifact_bytes:
            raise InvalidArgument("size_bytes", f"exceeds the limit of {self.config.max_artifact_bytes} bytes")
        sha256 = sha256.lower()
        if not _SHA_RE.match(sha256):
            raise InvalidArgument("sha256", "must be 64 hexadecimal characters")
        with self.db.session() as s:
            row = self._version_row(s, name, version, include_pending=True)
            if row.status != STATUS_PENDING_UPLOAD:
                raise FailedPrecondition(f"version {version} of {name!r} already has an artifact; "
                                         "create a new version instead")
            filename = filename or ("model.onnx" if row.framework == "onnx" else "model.bin")
            if not _FILENAME_RE.match(filename):
                raise InvalidArgument("filename", f"{quote(filename)} is not a plain file name")
            upload_id = uuid.uuid4().hex
            now = _now()
            s.execute(insert(T.uploads).values(
                upload_id=upload_id, version_id=row.id, size_bytes=size_bytes, received_bytes=0, next_part=0,
                sha256=sha256, filename=filename, created_by=principal, create_time=now, update_time=now))
        self._hashers[upload_id] = (hashlib.sha256(), 0)
        return Upload(upload_id, name, version, size_bytes, 0, sha256, filename)

    def get_upload(self, upload_id: str) -> Upload:
        with self.db.read() as s:
            return _upload_from_row(self._upload_row(s, upload_id))

    def append_chunk(self, upload_id: str, offset: int, data: bytes) -> int:
        if not data:
            raise InvalidArgument("data", "is empty")
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidArgument("data", f"chunks are at most {MAX_CHUNK_BYTES} bytes")
        with self._lock_for(upload_id):
            with self.db.read() as s:
                r = self._upload_row(s, upload_id)
            up, part = _upload_from_row(r), r.next_part
            if offset != up.received_bytes:
                raise FailedPrecondition(f"offset {offset} does not match received_bytes {up.received_bytes}; "
                                         "resume from received_bytes")
            if offset + len(data) > up.size_bytes:
                raise InvalidArgument("data", f"would exceed the declared size_bytes {up.size_bytes}")
            # Bytes first, then the row: a crash in between leaves a staged part the row does not
            # count, which the retried chunk overwrites (same part number).
            self.store.stage_part(upload_id, part, data)
            with self.db.session() as s:
                # Conditional on the offset: with several registry replicas, two appends of the same
                # chunk can race; one wins, the other is told to resume (the commit's sha256 check
                # catches any bytes a loser overwrote).
                done = s.execute(update(T.uploads).where(
                    T.uploads.c.upload_id == upload_id, T.uploads.c.received_bytes == offset).values(
                    received_bytes=offset + len(data), next_part=part + 1, update_time=_now()))
                if done.rowcount != 1:
                    raise FailedPrecondition("a concurrent append moved the upload on; resume from "
                                             "GetArtifactUpload's received_bytes")
            hasher, hashed = self._hashers.get(upload_id, (None, -1))
            if hasher is not None and hashed == offset:
                hasher.update(data)
                self._hashers[upload_id] = (hasher, offset + len(data))
            return offset + len(data)

    def commit_upload(self, upload_id: str) -> Version:
        """Verify, validate, publish and record the upload; the version becomes READY (and
        visible). Committing again an upload whose commit was interrupted (a crash, a lost
        reply) finishes it: from the staged bytes, or from the published object when the
        publish had completed (the staged copy is gone by then)."""
        with self._lock_for(upload_id):
            with self.db.read() as s:
                r = self._upload_row(s, upload_id)
            up = _upload_from_row(r)
            if r.status != STATUS_PENDING_UPLOAD:  # another upload of this version committed first
                self._drop_upload(upload_id)
                raise FailedPrecondition(f"version {up.version} of {up.name!r} already has an artifact; "
                                         "the upload was discarded")
            if up.received_bytes != up.size_bytes:
                raise FailedPrecondition(f"upload has {up.received_bytes} of {up.size_bytes} bytes; "
                                         "append the rest before committing")
            published = bool(r.publish_key) and self.store.exists(r.publish_key)

            def content() -> Iterator[bytes]:
                return self.store.open_read(r.publish_key) if published else self.store.read_staged(upload_id)

            hasher, hashed = self._hashers.pop(upload_id, (None, -1))
            data = b"".join(content()) if r.framework == "onnx" else None
            if hasher is not None and hashed == up.size_bytes and not published:
                digest = hasher.hexdigest()
            else:
                digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256_of(content())
            if digest != up.sha256:
                self._drop_upload(upload_id)
                raise InvalidArgument("sha256", f"mismatch: declared {up.sha256}, received bytes hash to "
                                                f"{digest}; the upload was discarded")
            signature: Signature | None = None
            if data is not None:
                try:
                    signature = validate_onnx(data)
                except InvalidArgument:
                    self._drop_upload(upload_id)
                    raise
            key = r.publish_key if published else f"models/{up.name}/{up.version}/{upload_id}/{up.filename}"
            if not published:
                with self.db.session() as s:
                    s.execute(update(T.uploads).where(T.uploads.c.upload_id == upload_id).values(
                        publish_key=key, update_time=_now()))
                self.store.publish(upload_id, key)
            values: dict[str, Any] = {
                "status": STATUS_READY, "artifact_key": key, "filename": up.filename,
                "size_bytes": up.size_bytes, "sha256": digest, "update_time": _now()}
            if signature is not None:  # the graph's tensors; allow_nan as the registrant declared it
                values["signature"] = signature.declared_by(Signature.from_json(r.signature)).to_json()
            with self.db.session() as s:
                # Conditional on the draft state: with several replicas, two commits can race;
                # exactly one records its key.
                won = s.execute(update(T.model_versions).where(
                    T.model_versions.c.id == r.version_id,
                    T.model_versions.c.status == STATUS_PENDING_UPLOAD).values(**values)).rowcount == 1
                s.execute(delete(T.uploads).where(T.uploads.c.upload_id == upload_id))
                recorded = None if won else s.execute(select(T.model_versions.c.artifact_key).where(
                    T.model_versions.c.id == r.version_id)).scalar_one_or_none()
            # A publish interrupted while removing the staged copy may have left some of it.
            self.store.discard_staged(upload_id)
            if not won:  # ours is garbage, unless the winner was this same upload on another replica
                if recorded != key:
                    self.store.delete(key)
                if recorded is None:
                    raise NotFound(f"version {up.version} of model {up.name!r} was deleted during the commit")
                raise FailedPrecondition(f"version {up.version} of {up.name!r} already has an artifact")
            with self.db.read() as s:
                return self._get_version(s, up.name, up.version)

    def abort_upload(self, upload_id: str) -> None:
        with self._lock_for(upload_id):
            with self.db.read() as s:
                self._upload_row(s, upload_id)
            self._drop_upload(upload_id)

    def _drop_upload(self, upload_id: str) -> None:
        """Forget an upload: its row, then its staged bytes and any object an interrupted
        commit published but never recorded."""
        self._hashers.pop(upload_id, None)
        u, v = T.uploads.c, T.model_versions.c
        with self.db.session() as s:
            row = s.execute(select(u.upload_id, u.publish_key, v.artifact_key)
                            .join(T.model_versions, u.version_id == v.id).where(u.upload_id == upload_id)).first()
            s.execute(delete(T.uploads).where(u.upload_id == upload_id))
        if row is None:
            self.store.discard_staged(upload_id)
        elif row.publish_key and row.publish_key == row.artifact_key:  # recorded: the version's file
            self.store.discard_staged(upload_id)
        else:
            self._discard_upload_files([row])

    def _discard_upload_files(self, uploads: list[Row]) -> None:
        """Staged bytes and unrecorded published objects of uploads whose rows are gone."""
        for r in uploads:
            if r.publish_key:
                self.store.delete(r.publish_key)
            self.store.discard_staged(r.upload_id)

    def _lock_for(self, upload_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._upload_locks.setdefault(upload_id, threading.Lock())

    def read_artifact(self, name: str, version: int, chunk_size: int = 1 << 20) -> tuple[Version, Iterator[bytes]]:
        v = self.get_version(name, version)  # committed only: a draft is NotFound
        try:
            return v, self.store.open_read(v.artifact_key, chunk_size)
        except ArtifactNotFound:
            raise NotFound(f"artifact of {name!r} version {version} is missing from the store") from None

    def recover(self, settle: timedelta = timedelta(minutes=10)) -> dict[str, int]:
        """Clean up after crashes (run at start-up). Uploads survive: one whose commit was
        interrupted keeps its bytes (staged, or published whole) for the client to commit
        again, and only what an interrupted publish left beside its key is removed. Uploads
        idle for `stale_upload_after` are dropped with their bytes; drafts (versions that never
        committed) idle that long with no upload are deleted with their request ids; staged
        bytes no upload knows are removed. Only what has not moved for `settle` is touched, so
        other registry replicas' work in progress is left alone; a restarted single registry
        passes settle=0. Returns counts for the log."""
        counts = {"interrupted_commits": 0, "stale_uploads": 0, "orphan_staged": 0, "abandoned_versions": 0}
        now = _now()
        quiet = now - settle
        cutoff = min(now - self.config.stale_upload_after, quiet)
        u = T.uploads.c
        with self.db.read() as s:
            rows = s.execute(select(u.upload_id, u.publish_key, u.update_time)).all()
        known = set()
        for r in rows:
            if _utc(r.update_time) > quiet:
                known.add(r.upload_id)
            elif _utc(r.update_time) < cutoff:
                self._drop_upload(r.upload_id)
                counts["stale_uploads"] += 1
            else:
                known.add(r.upload_id)
                if r.publish_key:
                    # A commit died between marking the key and recording it. If the publish
                    # completed, the object is whole and the re-commit records it; if not, the
                    # staged bytes are whole and only a temp file beside the key may be left.
                    if not self.store.exists(r.publish_key):
                        self.store.delete(r.publish_key)
                    counts["interrupted_commits"] += 1
        for staged in self.store.list_staged():
            if staged.upload_id not in known and staged.modified <= quiet:
                self.store.discard_staged(staged.upload_id)
                counts["orphan_staged"] += 1
        counts["abandoned_versions"] = self._delete_abandoned_versions(cutoff)
        return counts

    def _delete_abandoned_versions(self, before: datetime) -> int:
        """Drafts not touched since `before` that have no upload in progress: a registration
        that failed or was given up. Their CreateModelVersion request ids go too, so a retry
        starts a new registration instead of finding a version that no longer exists."""
        v, m, k = T.model_versions.c, T.registered_models.c, T.idempotency_keys.c
        with self.db.session() as s:
            rows = s.execute(select(v.id, m.name, v.version).join(T.registered_models, v.model_id == m.id).where(
                v.status == STATUS_PENDING_UPLOAD, v.update_time < before,
                ~exists().where(T.uploads.c.version_id == v.id))).all()
            if rows:
                s.execute(delete(T.model_versions).where(v.id.in_([r.id for r in rows])))
                s.execute(delete(T.idempotency_keys).where(
                    k.method == "CreateModelVersion", k.resource.in_([f"{r.name}/{r.version}" for r in rows])))
        return len(rows)

    # -- promotions --------------------------------------------------------------------------
    def request_promotion(self, name: str, version: int, alias: str, reason: str, principal: str,
                          request_id: str = "") -> Promotion:
        check_name(name)
        check_version(version)
        alias = check_alias(alias or "production")
        check_text(reason, "reason", 4096)
        check_request_id(request_id)
        payload = {"name": name, "version": version, "alias": alias, "reason": reason}
        with self.db.session() as s:
            prior = self._idempotent(s, principal, "RequestPromotion", request_id, payload)
            if prior is not None:
                return self._promotion(s, prior)
            row = self._version_row(s, name, version)  # committed only: a draft is NotFound
            p = T.promotions.c
            dup = s.execute(select(p.promotion_id).where(
                p.model_id == row.model_id, p.version == version, p.alias == alias,
                p.state == PROMOTION_PENDING)).scalar_one_or_none()
            if dup:
                raise AlreadyExists(f"promotion {dup} of version {version} to {alias!r} is already pending")
            pid = uuid.uuid4().hex[:16]
            s.execute(insert(T.promotions).values(
                promotion_id=pid, model_id=row.model_id, version=version, alias=alias, state=PROMOTION_PENDING,
                requested_by=principal, reason=reason, request_time=_now()))
            self._remember(s, principal, "RequestPromotion", request_id, payload, pid)
            return self._promotion(s, pid)

    def decide_promotion(self, promotion_id: str, principal: str, approve: bool, comment: str = "") -> tuple[
            Promotion, Version | None]:
        if not promotion_id:
            raise InvalidArgument("promotion_id", "is required")
        check_text(comment, "comment", 4096)
        with self.db.session() as s:
            p = self._promotion(s, promotion_id)
            if p.state != PROMOTION_PENDING:
                raise FailedPrecondition(f"promotion {promotion_id} is already decided")
            if p.requested_by == principal:
                raise PermissionDenied(f"self-approval refused: {principal} requested promotion {promotion_id}; "
                                       "another approver must decide it")
            version = None
            if approve:
                previous = self._move_alias(s, p.name, p.alias, p.version, principal)
                vc = T.model_versions.c
                mid = self._model_id(s, p.name)
                if previous and previous != p.version:
                    s.execute(update(T.model_versions).where(
                        vc.model_id == mid, vc.version == previous, vc.stage == STAGE_PRODUCTION).values(
                        stage=STAGE_ARCHIVED, update_time=_now()))
                s.execute(update(T.model_versions).where(vc.model_id == mid, vc.version == p.version).values(
                    stage=STAGE_PRODUCTION, update_time=_now()))
            s.execute(update(T.promotions).where(T.promotions.c.promotion_id == promotion_id).values(
                state=PROMOTION_APPROVED if approve else PROMOTION_REJECTED, decided_by=principal,
                decision_comment=comment, decision_time=_now()))
            if approve:
                version = self._get_version(s, p.name, p.version)
            return self._promotion(s, promotion_id), version

    def list_promotions(self, *, name: str = "", state: int = 0, size: int = 0,
                        token: str = "") -> tuple[list[Promotion], str]:
        n = page_size(size)
        q_key = {"name": name, "state": state}
        after = PageToken.decode(token, q_key)
        p, m = T.promotions.c, T.registered_models.c
        stmt = (select(T.promotions, m.name).join(T.registered_models, p.model_id == m.id)
                .order_by(p.seq.desc()).limit(n + 1))
        if name:
            stmt = stmt.where(m.name == check_name(name))
        if state:
            stmt = stmt.where(p.state == state)
        if after is not None:
            stmt = stmt.where(p.seq < int(after))
        with self.db.read() as s:
            rows = s.execute(stmt).all()
        more = len(rows) > n
        rows = rows[:n]
        return [self._promotion_from_row(r) for r in rows], PageToken.encode(rows[-1].seq, q_key) if more else ""

    # -- helpers -----------------------------------------------------------------------------
    def _idempotent(self, s: Connection, principal: str, method: str, request_id: str, payload: dict) -> str | None:
        if not request_id:
            return None
        k = T.idempotency_keys.c
        row = s.execute(select(k.request_hash, k.resource).where(
            k.principal == principal, k.method == method, k.request_id == request_id)).first()
        if row is None:
            return None
        if row.request_hash != _hash(payload):
            raise InvalidArgument("request_id", f"{request_id!r} was already used for a different request")
        return row.resource

    def _remember(self, s: Connection, principal: str, method: str, request_id: str, payload: dict,
                  resource: str) -> None:
        if request_id:
            s.execute(insert(T.idempotency_keys).values(
                principal=principal, method=method, request_id=request_id, request_hash=_hash(payload),
                resource=resource, create_time=_now()))

    def _model_id(self, s: Connection, name: str) -> int:
        mid = s.execute(select(T.registered_models.c.id).where(T.registered_models.c.name == name)).scalar()
        if mid is None:
            raise NotFound(f"model {name!r} not found")
        return mid

    def _get_model(self, s: Connection, name: str) -> Model:
        row = s.execute(select(T.registered_models).where(T.registered_models.c.name == name)).first()
        if row is None:
            raise NotFound(f"model {name!r} not found")
        return self._models_from_rows(s, [row])[0]

    def _models_from_rows(self, s: Connection, rows: list[Row]) -> list[Model]:
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
                      create_time=_utc(r.create_time), update_time=_utc(r.update_time)) for r in rows]

    # Lookups see committed versions only unless include_pending: a draft exists for its
    # own upload flow (and delete), nothing else, so no caller can expose one by mistake.
    def _version_row(self, s: Connection, name: str, version: int, *, include_pending: bool = False) -> Row:
        mid = self._model_id(s, name)
        v = T.model_versions.c
        stmt = select(T.model_versions).where(v.model_id == mid, v.version == version)
        if not include_pending:
            stmt = stmt.where(v.status == STATUS_READY)
        row = s.execute(stmt).first()
        if row is None:
            raise NotFound(f"version {version} of model {name!r} not found")
        return row

    def _get_version(self, s: Connection, name: str, version: int, *, include_pending: bool = False) -> Version:
        v = T.model_versions.c
        stmt = (select(T.model_versions, T.registered_models.c.name)
                .join(T.registered_models, v.model_id == T.registered_models.c.id)
                .where(T.registered_models.c.name == name, v.version == version))
        if not include_pending:
            stmt = stmt.where(v.status == STATUS_READY)
        row = s.execute(stmt).first()
        if row is None:
            self._model_id(s, name)  # NOT_FOUND names the model when that is what is missing
            raise NotFound(f"version {version} of model {name!r} not found")
        return self._versions_from_rows(s, [row])[0]

    def _versions_from_rows(self, s: Connection, rows: list[Row]) -> list[Version]:
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
            artifact_key=r.artifact_key, artifact_uri=self.store.uri(r.artifact_key) if r.artifact_key else "",
            filename=r.filename, size_bytes=r.size_bytes, sha256=r.sha256, aliases=aliases[r.id],
            created_by=r.created_by, create_time=_utc(r.create_time), update_time=_utc(r.update_time),
        ) for r in rows]

    def _upload_row(self, s: Connection, upload_id: str) -> Row:
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

    def _promotion(self, s: Connection, promotion_id: str) -> Promotion:
        p, m = T.promotions.c, T.registered_models.c
        r = s.execute(select(T.promotions, m.name).join(T.registered_models, p.model_id == m.id)
                      .where(p.promotion_id == promotion_id)).first()
        if r is None:
            raise NotFound(f"promotion {quote(promotion_id)} not found")
        return self._promotion_from_row(r)

    @staticmethod
    def _promotion_from_row(r: Row) -> Promotion:
        return Promotion(r.promotion_id, r.name, r.version, r.alias, r.state, r.requested_by, r.reason,
                         r.decided_by, r.decision_comment, _utc(r.request_time), _utc(r.decision_time))


def _upload_from_row(r: Row) -> Upload:
    return Upload(r.upload_id, r.name, r.version, r.size_bytes, r.received_bytes, r.sha256, r.filename)


def _sha256_of(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()
