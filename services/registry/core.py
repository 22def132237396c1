"""The model registry's domain logic: plain Python over SQLAlchemy and the artifact store.
Nothing here knows about protobuf or gRPC; server.py translates.

Crash safety of artifacts (see services/common/artifacts/base.py for the store's half):
- chunk bytes are staged under the upload id and become visible only through `publish`;
- the key to publish is written to the upload row before publishing, and the version row
  points at the key only after publishing, in one transaction;
- `recover()` (run at start-up) removes what an interrupted upload or commit left behind.
So a version never points at a missing or partial file, whatever moment the process dies.
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
    AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
)
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

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


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
    latest_version: int = 0
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
        raise InvalidArgument(field_name, f"{name[:140]!r} is not a valid model name (letters, digits, "
                                          "'.', '_', '-'; 1-128 characters; starts with a letter or digit)")
    return name


def check_version(version: int, field_name: str = "version") -> int:
    if version <= 0:
        raise InvalidArgument(field_name, f"must be a positive version number, got {version}")
    return version


def check_alias(alias: str, field_name: str = "alias") -> str:
    if not alias:
        raise InvalidArgument(field_name, "is required")
    if not _ALIAS_RE.match(alias):
        raise InvalidArgument(field_name, f"{alias[:70]!r} is not a valid alias (lower-case letters, digits, "
                                          "'_', '-'; 1-64 characters)")
    if alias == "latest" or re.fullmatch(r"v\d+", alias):
        raise InvalidArgument(field_name, f"{alias!r} is reserved (it would read as a version)")
    return alias


def check_tags(tags: dict[str, str], field_name: str = "tags") -> dict[str, str]:
    for k, v in tags.items():
        if not _TAG_KEY_RE.match(k):
            raise InvalidArgument(f"{field_name}[{k[:130]!r}]", "tag keys are 1-128 of [A-Za-z0-9_.:/-]")
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
                    latest_version=0, create_time=now, update_time=now)).inserted_primary_key[0]
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
        tags = tags or []
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
                raise InvalidArgument(f"tags[{i}]", f"{tag[:140]!r} is not 'key' or 'key=value'")
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
            staged = s.execute(select(T.uploads.c.upload_id).join(
                T.model_versions, T.uploads.c.version_id == T.model_versions.c.id).where(
                T.model_versions.c.model_id == mid)).scalars().all()
            s.execute(delete(T.registered_models).where(T.registered_models.c.id == mid))
        # Files go after the rows: a crash in between leaves unreferenced files, never rows
        # pointing at missing files.
        for key in keys:
            self.store.delete(key)
        for upload_id in staged:
            self.store.discard_staged(upload_id)

    # -- versions ----------------------------------------------------------------------------
    def create_version(self, name: str, *, framework: str, principal: str, description: str = "",
                       tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None,
                       lineage: Lineage | None = None, signature: Signature | None = None,
                       request_id: str = "") -> Version:
        check_name(name)
        if framework not in FRAMEWORKS:
            raise InvalidArgument("framework", f"{framework[:40]!r} is not one of {', '.join(FRAMEWORKS)}")
        check_text(description, "description")
        tags = check_tags(tags or {})
        metrics = dict(metrics or {})
        for k, v in metrics.items():
            if not k or len(k) > 128 or v != v:  # NaN never equals itself
                raise InvalidArgument(f"metrics[{k[:130]!r}]", "metric names are 1-128 characters, values not NaN")
        lineage = lineage or Lineage()
        for i, fv in enumerate(lineage.feature_views):
            if not re.fullmatch(r"[A-Za-z0-9_.-]+:\d+", fv):
                raise InvalidArgument(f"lineage.feature_views[{i}]", f"{fv[:100]!r} is not 'name:version'")
        check_request_id(request_id)
        payload = {"name": name, "framework": framework, "description": description, "tags": tags,
                   "metrics": metrics, "lineage": lineage.__dict__,
                   "signature": (signature or Signature()).to_json()}
        with self.db.session() as s:
            prior = self._idempotent(s, principal, "CreateModelVersion", request_id, payload)
            if prior is not None:
                pname, pver = prior.rsplit("/", 1)
                return self._get_version(s, pname, int(pver))
            mid = self._model_id(s, name)
            # One UPDATE ... RETURNING takes the row lock and bumps the counter: version numbers
            # are monotonic and never reused, even under concurrent creates or after deletes.
            version = s.execute(update(T.registered_models).where(T.registered_models.c.id == mid).values(
                latest_version=T.registered_models.c.latest_version + 1, update_time=_now())
                .returning(T.registered_models.c.latest_version)).scalar_one()
            now = _now()
            s.execute(insert(T.model_versions).values(
                model_id=mid, version=version, framework=framework, status=STATUS_PENDING_UPLOAD,
                stage=STAGE_NONE, description=description, tags=tags, metrics=metrics,
                signature=(signature or Signature()).to_json(), lineage=lineage.__dict__,
                created_by=principal, create_time=now, update_time=now))
            self._remember(s, principal, "CreateModelVersion", request_id, payload, f"{name}/{version}")
            return self._get_version(s, name, version)

    def get_version(self, name: str, version: int) -> Version:
        check_name(name)
        check_version(version)
        with self.db.read() as s:
            return self._get_version(s, name, version)

    def list_versions(self, name: str, *, stage: int = 0, status: int = 0, size: int = 0,
                      token: str = "") -> tuple[list[Version], str]:
        n = page_size(size)
        q_key = {"name": name, "stage": stage, "status": status}
        after = PageToken.decode(token, q_key)
        v, m = T.model_versions.c, T.registered_models.c
        stmt = (select(T.model_versions, m.name).join(T.registered_models, v.model_id == m.id)
                .order_by(v.id.desc()).limit(n + 1))
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
        check_name(name)
        check_version(version)
        with self.db.session() as s:
            row = self._version_row(s, name, version)
            held = s.execute(select(T.aliases.c.alias).where(T.aliases.c.version_id == row.id)).scalars().all()
            if held:
                raise FailedPrecondition(f"version {version} of {name!r} is aliased as {sorted(held)}; "
                                         "move or delete the aliases first")
            staged = s.execute(select(T.uploads.c.upload_id).where(T.uploads.c.version_id == row.id)).scalars().all()
            s.execute(delete(T.model_versions).where(T.model_versions.c.id == row.id))
        if row.artifact_key:
            self.store.delete(row.artifact_key)
        for upload_id in staged:
            self.store.discard_staged(upload_id)

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
        row = self._version_row(s, name, version)
        if row.status != STATUS_READY:
            raise FailedPrecondition(f"version {version} of {name!r} has no committed artifact yet")
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
            row = self._version_row(s, name, version)
            if row.status != STATUS_PENDING_UPLOAD:
                raise FailedPrecondition(f"version {version} of {name!r} already has an artifact; "
                                         "create a new version instead")
            filename = filename or ("model.onnx" if row.framework == "onnx" else "model.bin")
            if not _FILENAME_RE.match(filename):
                raise InvalidArgument("filename", f"{filename[:100]!r} is not a plain file name")
            upload_id = uuid.uuid4().hex
            now = _now()
            s.execute(insert(T.uploads).values(
                upload_id=upload_id, version_id=row.id, size_bytes=size_bytes, received_bytes=0, next_part=0,
                sha256=sha256, filename=filename, created_by=principal, create_time=now, update_time=now))
        self._hashers[upload_id] = (hashlib.sha256(), 0)
        return Upload(upload_id, name, version, size_bytes, 0, sha256, filename)

    def get_upload(self, upload_id: str) -> Upload:
        with self.db.read() as s:
            return self._upload(s, upload_id)[0]

    def append_chunk(self, upload_id: str, offset: int, data: bytes) -> int:
        if not data:
            raise InvalidArgument("data", "is empty")
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidArgument("data", f"chunks are at most {MAX_CHUNK_BYTES} bytes")
        with self._lock_for(upload_id):
            with self.db.session() as s:
                up, part = self._upload(s, upload_id)
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
        with self._lock_for(upload_id):
            with self.db.session() as s:
                up, _ = self._upload(s, upload_id)
                vrow = self._version_row(s, up.name, up.version)
            if up.received_bytes != up.size_bytes:
                raise FailedPrecondition(f"upload has {up.received_bytes} of {up.size_bytes} bytes; "
                                         "append the rest before committing")
            hasher, hashed = self._hashers.pop(upload_id, (None, -1))
            data: bytes | None = None
            if vrow.framework == "onnx":
                data = b"".join(self.store.read_staged(upload_id))
            if hasher is not None and hashed == up.size_bytes:
                digest = hasher.hexdigest()
            else:
                digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256_of(
                    self.store.read_staged(upload_id))
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
            key = f"models/{up.name}/{up.version}/{upload_id}/{up.filename}"
            with self.db.session() as s:
                s.execute(update(T.uploads).where(T.uploads.c.upload_id == upload_id).values(publish_key=key))
            self.store.publish(upload_id, key)
            with self.db.session() as s:
                fresh = self._version_row(s, up.name, up.version)
                if fresh.status != STATUS_PENDING_UPLOAD:
                    won = False
                else:
                    values: dict[str, Any] = {
                        "status": STATUS_READY, "artifact_key": key, "filename": up.filename,
                        "size_bytes": up.size_bytes, "sha256": digest, "update_time": _now()}
                    if signature is not None:
                        values["signature"] = signature.to_json()
                    s.execute(update(T.model_versions).where(T.model_versions.c.id == fresh.id).values(**values))
                    won = True
                s.execute(delete(T.uploads).where(T.uploads.c.upload_id == upload_id))
            if not won:  # another upload committed first; ours is garbage
                self.store.delete(key)
                raise FailedPrecondition(f"version {up.version} of {up.name!r} already has an artifact")
            with self.db.session() as s:
                return self._get_version(s, up.name, up.version)

    def abort_upload(self, upload_id: str) -> None:
        with self._lock_for(upload_id):
            with self.db.session() as s:
                self._upload(s, upload_id)
            self._drop_upload(upload_id)

    def _drop_upload(self, upload_id: str) -> None:
        self._hashers.pop(upload_id, None)
        with self.db.session() as s:
            s.execute(delete(T.uploads).where(T.uploads.c.upload_id == upload_id))
        self.store.discard_staged(upload_id)

    def _lock_for(self, upload_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._upload_locks.setdefault(upload_id, threading.Lock())

    def read_artifact(self, name: str, version: int, chunk_size: int = 1 << 20) -> tuple[Version, Iterator[bytes]]:
        v = self.get_version(name, version)
        if v.status != STATUS_READY:
            raise FailedPrecondition(f"version {version} of {name!r} has no committed artifact yet")
        try:
            return v, self.store.open_read(v.artifact_key, chunk_size)
        except ArtifactNotFound:
            raise NotFound(f"artifact of {name!r} version {version} is missing from the store") from None

    def recover(self, settle: timedelta = timedelta(minutes=10)) -> dict[str, int]:
        """Clean up after crashes (run at start-up): interrupted commits, stale uploads, staged
        bytes no upload row knows. Only what has not moved for `settle` is touched, so other
        registry replicas' uploads and commits in progress are left alone; a restarted single
        registry passes settle=0. Returns counts for the log."""
        counts = {"unpublished": 0, "stale_uploads": 0, "orphan_staged": 0}
        now = _now()
        cutoff = now - self.config.stale_upload_after
        with self.db.session() as s:
            rows = s.execute(select(T.uploads.c.upload_id, T.uploads.c.publish_key, T.uploads.c.update_time,
                                    T.model_versions.c.artifact_key)
                             .join(T.model_versions, T.uploads.c.version_id == T.model_versions.c.id)).all()
        known = set()
        for r in rows:
            if _utc(r.update_time) > now - settle:
                known.add(r.upload_id)
            elif r.publish_key:  # a commit died between publish and the row update
                if r.artifact_key != r.publish_key:
                    self.store.delete(r.publish_key)
                self._drop_upload(r.upload_id)
                counts["unpublished"] += 1
            elif _utc(r.update_time) < cutoff:
                self._drop_upload(r.upload_id)
                counts["stale_uploads"] += 1
            else:
                known.add(r.upload_id)
        for staged in self.store.list_staged():
            if staged.upload_id not in known and staged.modified <= now - settle:
                self.store.discard_staged(staged.upload_id)
                counts["orphan_staged"] += 1
        return counts

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
            row = self._version_row(s, name, version)
            if row.status != STATUS_READY:
                raise FailedPrecondition(f"version {version} of {name!r} has no committed artifact yet")
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
        """Tags and aliases for a whole page in two queries (never one per model)."""
        ids = [r.id for r in rows]
        tags: dict[int, dict[str, str]] = {i: {} for i in ids}
        aliases: dict[int, dict[str, int]] = {i: {} for i in ids}
        if ids:
            for mid, k, v in s.execute(select(T.model_tags.c.model_id, T.model_tags.c.key, T.model_tags.c.value)
                                       .where(T.model_tags.c.model_id.in_(ids))):
                tags[mid][k] = v
            for mid, alias, ver in s.execute(
                    select(T.aliases.c.model_id, T.aliases.c.alias, T.model_versions.c.version)
                    .join(T.model_versions, T.aliases.c.version_id == T.model_versions.c.id)
                    .where(T.aliases.c.model_id.in_(ids))):
                aliases[mid][alias] = ver
        return [Model(name=r.name, description=r.description, owner=r.owner, tags=tags[r.id],
                      latest_version=r.latest_version, aliases=aliases[r.id],
                      create_time=_utc(r.create_time), update_time=_utc(r.update_time)) for r in rows]

    def _version_row(self, s: Connection, name: str, version: int) -> Row:
        mid = self._model_id(s, name)
        row = s.execute(select(T.model_versions).where(
            T.model_versions.c.model_id == mid, T.model_versions.c.version == version)).first()
        if row is None:
            raise NotFound(f"version {version} of model {name!r} not found")
        return row

    def _get_version(self, s: Connection, name: str, version: int) -> Version:
        row = s.execute(select(T.model_versions, T.registered_models.c.name)
                        .join(T.registered_models, T.model_versions.c.model_id == T.registered_models.c.id)
                        .where(T.registered_models.c.name == name, T.model_versions.c.version == version)).first()
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

    def _upload(self, s: Connection, upload_id: str) -> tuple[Upload, int]:
        if not upload_id:
            raise InvalidArgument("upload_id", "is required")
        u, v, m = T.uploads.c, T.model_versions.c, T.registered_models.c
        r = s.execute(select(T.uploads, v.version, m.name)
                      .join(T.model_versions, u.version_id == v.id)
                      .join(T.registered_models, v.model_id == m.id)
                      .where(u.upload_id == upload_id)).first()
        if r is None:
            raise NotFound(f"upload {upload_id!r} not found (committed, aborted or expired)")
        return Upload(r.upload_id, r.name, r.version, r.size_bytes, r.received_bytes, r.sha256,
                      r.filename), r.next_part

    def _promotion(self, s: Connection, promotion_id: str) -> Promotion:
        p, m = T.promotions.c, T.registered_models.c
        r = s.execute(select(T.promotions, m.name).join(T.registered_models, p.model_id == m.id)
                      .where(p.promotion_id == promotion_id)).first()
        if r is None:
            raise NotFound(f"promotion {promotion_id!r} not found")
        return self._promotion_from_row(r)

    @staticmethod
    def _promotion_from_row(r: Row) -> Promotion:
        return Promotion(r.promotion_id, r.name, r.version, r.alias, r.state, r.requested_by, r.reason,
                         r.decided_by, r.decision_comment, _utc(r.request_time), _utc(r.decision_time))


def _sha256_of(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()
