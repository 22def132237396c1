"""Artifact uploads: begin, append chunks (resumable by offset), commit (verify, validate,
publish, record: the version becomes READY) and abort.

Crash safety of artifacts (see services/common/artifacts/base.py for the store's half):
- chunk bytes are staged under the upload id and become visible only through `publish`;
- the key to publish is written to the upload row before publishing, and the version row
  points at the key only after publishing, in one transaction;
- a commit that dies before recording is finished by committing the upload again: from the
  staged bytes when the publish had not completed, from the published object (whole, since
  publishing is atomic) when it had; `recover()` (recovery.py, run at start-up) removes what an
  interrupted publish left beside the key, and only uploads idle past `stale_upload_after` are
  dropped.
So a version never points at a missing or partial file, whatever moment the process dies, and
acknowledged chunks survive a crash.
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Row, delete, insert, select, update

from services.common.artifacts import ArtifactStore
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from services.registry import tables as T
from services.registry.onnx_check import Signature, validate_onnx

from .checks import check_name, check_version
from .entities import STATUS_PENDING_UPLOAD, STATUS_READY, Upload, Version, utc_now
from .rows import load_version, upload_from_row, upload_row, version_row

MAX_CHUNK_BYTES = 8 << 20

_SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")
_FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z")


class Uploads:
    def __init__(self, db: Database, store: ArtifactStore, max_artifact_bytes: int) -> None:
        self.db = db
        self.store = store
        self.max_artifact_bytes = max_artifact_bytes
        # Running sha256 per upload, fed as chunks arrive (recomputed from the staged bytes
        # at commit if this process did not see every chunk, e.g. after a restart).
        self._hashers: dict[str, tuple[Any, int]] = {}
        # One lock per upload in use: an entry lives while a caller holds its lock object, so the
        # table does not grow with every upload the process has ever seen.
        self._upload_locks: weakref.WeakValueDictionary[str, _UploadLock] = weakref.WeakValueDictionary()
        self._locks_guard = threading.Lock()

    def begin_upload(self, name: str, version: int, *, size_bytes: int, sha256: str, filename: str,
                     principal: str) -> Upload:
        check_name(name)
        check_version(version)
        if size_bytes <= 0:
            raise InvalidArgument("size_bytes", "must be positive")
        if size_bytes > self.max_artifact_bytes:
            raise InvalidArgument("size_bytes", f"exceeds the limit of {self.max_artifact_bytes} bytes")
        sha256 = sha256.lower()
        if not _SHA_RE.match(sha256):
            raise InvalidArgument("sha256", "must be 64 hexadecimal characters")
        with self.db.session() as s:
            row = version_row(s, name, version, include_pending=True)
            if row.status != STATUS_PENDING_UPLOAD:
                raise FailedPrecondition(f"version {version} of {name!r} already has an artifact; "
                                         "create a new version instead")
            filename = filename or ("model.onnx" if row.framework == "onnx" else "model.bin")
            if not _FILENAME_RE.match(filename):
                raise InvalidArgument("filename", f"{quote(filename)} is not a plain file name")
            upload_id = uuid.uuid4().hex
            now = utc_now()
            s.execute(insert(T.uploads).values(
                upload_id=upload_id, version_id=row.id, size_bytes=size_bytes, received_bytes=0, next_part=0,
                sha256=sha256, filename=filename, created_by=principal, create_time=now, update_time=now))
        self._hashers[upload_id] = (hashlib.sha256(), 0)
        return Upload(upload_id, name, version, size_bytes, 0, sha256, filename)

    def get_upload(self, upload_id: str) -> Upload:
        with self.db.read() as s:
            return upload_from_row(upload_row(s, upload_id))

    def append_chunk(self, upload_id: str, offset: int, data: bytes) -> int:
        if not data:
            raise InvalidArgument("data", "is empty")
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidArgument("data", f"chunks are at most {MAX_CHUNK_BYTES} bytes")
        with self._lock_for(upload_id):
            with self.db.read() as s:
                r = upload_row(s, upload_id)
            up, part = upload_from_row(r), r.next_part
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
                    received_bytes=offset + len(data), next_part=part + 1, update_time=utc_now()))
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
                r = upload_row(s, upload_id)
            up = upload_from_row(r)
            if r.status != STATUS_PENDING_UPLOAD:  # another upload of this version committed first
                self.drop_upload(upload_id)
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
                self.drop_upload(upload_id)
                raise InvalidArgument("sha256", f"mismatch: declared {up.sha256}, received bytes hash to "
                                                f"{digest}; the upload was discarded")
            signature: Signature | None = None
            if data is not None:
                try:
                    signature = validate_onnx(data)
                except InvalidArgument:
                    self.drop_upload(upload_id)
                    raise
            key = r.publish_key if published else f"models/{up.name}/{up.version}/{upload_id}/{up.filename}"
            if not published:
                with self.db.session() as s:
                    s.execute(update(T.uploads).where(T.uploads.c.upload_id == upload_id).values(
                        publish_key=key, update_time=utc_now()))
                self.store.publish(upload_id, key)
            values: dict[str, Any] = {
                "status": STATUS_READY, "artifact_key": key, "filename": up.filename,
                "size_bytes": up.size_bytes, "sha256": digest, "update_time": utc_now()}
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
                return load_version(s, self.store, up.name, up.version)

    def abort_upload(self, upload_id: str) -> None:
        with self._lock_for(upload_id):
            with self.db.read() as s:
                upload_row(s, upload_id)
            self.drop_upload(upload_id)

    def drop_upload(self, upload_id: str) -> None:
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
            discard_upload_files(self.store, [row])

    def _lock_for(self, upload_id: str) -> _UploadLock:
        with self._locks_guard:
            lock = self._upload_locks.get(upload_id)
            if lock is None:
                lock = self._upload_locks[upload_id] = _UploadLock()
            return lock


class _UploadLock:
    """A mutex that a WeakValueDictionary can hold (threading.Lock takes no weak references)."""

    __slots__ = ("_lock", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def discard_upload_files(store: ArtifactStore, uploads: list[Row]) -> None:
    """Staged bytes and unrecorded published objects of uploads whose rows are gone."""
    for r in uploads:
        if r.publish_key:
            store.delete(r.publish_key)
        store.discard_staged(r.upload_id)


def _sha256_of(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()
