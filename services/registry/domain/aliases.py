"""Aliases: named pointers to committed versions (MLflow's rules; `latest` and `v<digits>`
reserved). Protected aliases move only through an approved promotion (promotions.py), which
moves them with `move_alias`."""

from __future__ import annotations

from sqlalchemy import Connection, delete, insert, select, update

from services.common.artifacts import ArtifactStore
from services.common.db import Database
from services.common.errors import FailedPrecondition, NotFound
from services.registry import tables as T

from .checks import check_alias, check_name, check_version
from .entities import Version, utc_now
from .rows import load_version, model_id, version_row


class Aliases:
    def __init__(self, db: Database, store: ArtifactStore, protected: frozenset[str]) -> None:
        self.db = db
        self.store = store
        self.protected = protected

    def set_alias(self, name: str, alias: str, version: int, principal: str) -> tuple[Version, int]:
        check_name(name)
        check_alias(alias)
        check_version(version)
        if alias in self.protected:
            raise FailedPrecondition(f"alias {alias!r} is protected: it moves only through an approved "
                                     "promotion (RequestPromotion)")
        with self.db.session() as s:
            previous = move_alias(s, name, alias, version, principal)
            return load_version(s, self.store, name, version), previous

    def delete_alias(self, name: str, alias: str) -> None:
        check_name(name)
        check_alias(alias)
        with self.db.session() as s:
            mid = model_id(s, name)
            if alias in self.protected:
                raise FailedPrecondition(f"alias {alias!r} is protected: it moves only through an approved "
                                         "promotion")
            gone = s.execute(delete(T.aliases).where(T.aliases.c.model_id == mid, T.aliases.c.alias == alias))
            if gone.rowcount == 0:
                raise NotFound(f"model {name!r} has no alias {alias!r}")

    def get_by_alias(self, name: str, alias: str) -> Version:
        check_name(name)
        check_alias(alias)
        with self.db.read() as s:
            mid = model_id(s, name)
            v = s.execute(select(T.model_versions.c.version).join(
                T.aliases, T.aliases.c.version_id == T.model_versions.c.id).where(
                T.aliases.c.model_id == mid, T.aliases.c.alias == alias)).scalar_one_or_none()
            if v is None:
                raise NotFound(f"model {name!r} has no alias {alias!r}")
            return load_version(s, self.store, name, v)


def move_alias(s: Connection, name: str, alias: str, version: int, principal: str) -> int:
    """Point `alias` at a committed version; returns the version it pointed at before (0: none)."""
    row = version_row(s, name, version)  # committed only: a draft is NotFound
    a = T.aliases.c
    prev = s.execute(select(T.model_versions.c.version).join(T.aliases, a.version_id == T.model_versions.c.id)
                     .where(a.model_id == row.model_id, a.alias == alias)).scalar_one_or_none()
    values = {"version_id": row.id, "updated_by": principal, "update_time": utc_now()}
    if prev is None:
        s.execute(insert(T.aliases).values(model_id=row.model_id, alias=alias, **values))
    else:
        s.execute(update(T.aliases).where(a.model_id == row.model_id, a.alias == alias).values(**values))
    return prev or 0
