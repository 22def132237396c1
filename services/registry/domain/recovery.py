"""Clean-up after crashes, run at start-up: the half of the crash-safety contract (uploads.py)
that needs no client. Interrupted commits are left for their client to commit again; what
nobody will come back for (idle uploads, abandoned drafts, staged bytes no upload knows) goes."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, exists, select

from services.common.artifacts import ArtifactStore
from services.common.db import Database
from services.common.idempotency import RequestIds
from services.registry import tables as T

from .entities import STATUS_PENDING_UPLOAD, as_utc, utc_now
from .uploads import Uploads


class Recovery:
    def __init__(self, db: Database, store: ArtifactStore, uploads: Uploads,
                 stale_upload_after: timedelta) -> None:
        self.db = db
        self.store = store
        self.uploads = uploads
        self.stale_upload_after = stale_upload_after

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
        now = utc_now()
        quiet = now - settle
        cutoff = min(now - self.stale_upload_after, quiet)
        u = T.uploads.c
        with self.db.read() as s:
            rows = s.execute(select(u.upload_id, u.publish_key, u.update_time)).all()
        known = set()
        for r in rows:
            if as_utc(r.update_time) > quiet:
                known.add(r.upload_id)
            elif as_utc(r.update_time) < cutoff:
                self.uploads.drop_upload(r.upload_id)
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
        v, m = T.model_versions.c, T.registered_models.c
        with self.db.session() as s:
            rows = s.execute(select(v.id, m.name, v.version).join(T.registered_models, v.model_id == m.id).where(
                v.status == STATUS_PENDING_UPLOAD, v.update_time < before,
                ~exists().where(T.uploads.c.version_id == v.id))).all()
            if rows:
                s.execute(delete(T.model_versions).where(v.id.in_([r.id for r in rows])))
                RequestIds(T.idempotency_keys).forget(s, "CreateModelVersion", [f"{r.name}/{r.version}" for r in rows])
        return len(rows)
