"""Promotions: the approval workflow that moves protected aliases. A request names a committed
version and an alias; a different principal approves (the alias moves, the version's stage
becomes PRODUCTION and the version it replaced is archived) or rejects it. Self-approval is
refused."""

from __future__ import annotations

import uuid

from sqlalchemy import insert, select, update

from services.common.artifacts import ArtifactStore
from services.common.db import Database
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, PermissionDenied
from services.common.idempotency import RequestIds, check_request_id
from services.common.paging import PageRequest
from services.registry import tables as T

from .aliases import move_alias
from .checks import check_alias, check_name, check_text, check_version
from .entities import (
    PROMOTION_APPROVED, PROMOTION_PENDING, PROMOTION_REJECTED, STAGE_ARCHIVED, STAGE_PRODUCTION, Promotion,
    Version, utc_now,
)
from .rows import load_promotion, load_version, model_id, promotion_from_row, version_row

_request_ids = RequestIds(T.idempotency_keys)


class Promotions:
    def __init__(self, db: Database, store: ArtifactStore) -> None:
        self.db = db
        self.store = store

    def request_promotion(self, name: str, version: int, alias: str, reason: str, principal: str,
                          request_id: str = "") -> Promotion:
        check_name(name)
        check_version(version)
        alias = check_alias(alias or "production")
        check_text(reason, "reason", 4096)
        check_request_id(request_id)
        payload = {"name": name, "version": version, "alias": alias, "reason": reason}
        with self.db.session() as s:
            prior = _request_ids.lookup(s, principal, "RequestPromotion", request_id, payload)
            if prior is not None:
                return load_promotion(s, prior)
            row = version_row(s, name, version)  # committed only: a draft is NotFound
            p = T.promotions.c
            dup = s.execute(select(p.promotion_id).where(
                p.model_id == row.model_id, p.version == version, p.alias == alias,
                p.state == PROMOTION_PENDING)).scalar_one_or_none()
            if dup:
                raise AlreadyExists(f"promotion {dup} of version {version} to {alias!r} is already pending")
            pid = uuid.uuid4().hex[:16]
            s.execute(insert(T.promotions).values(
                promotion_id=pid, model_id=row.model_id, version=version, alias=alias, state=PROMOTION_PENDING,
                requested_by=principal, reason=reason, request_time=utc_now()))
            _request_ids.remember(s, principal, "RequestPromotion", request_id, payload, pid)
            return load_promotion(s, pid)

    def decide_promotion(self, promotion_id: str, principal: str, approve: bool, comment: str = "") -> tuple[
            Promotion, Version | None]:
        if not promotion_id:
            raise InvalidArgument("promotion_id", "is required")
        check_text(comment, "comment", 4096)
        with self.db.session() as s:
            p = load_promotion(s, promotion_id)
            if p.state != PROMOTION_PENDING:
                raise FailedPrecondition(f"promotion {promotion_id} is already decided")
            if p.requested_by == principal:
                raise PermissionDenied(f"self-approval refused: {principal} requested promotion {promotion_id}; "
                                       "another approver must decide it")
            version = None
            if approve:
                previous = move_alias(s, p.name, p.alias, p.version, principal)
                vc = T.model_versions.c
                mid = model_id(s, p.name)
                if previous and previous != p.version:
                    s.execute(update(T.model_versions).where(
                        vc.model_id == mid, vc.version == previous, vc.stage == STAGE_PRODUCTION).values(
                        stage=STAGE_ARCHIVED, update_time=utc_now()))
                s.execute(update(T.model_versions).where(vc.model_id == mid, vc.version == p.version).values(
                    stage=STAGE_PRODUCTION, update_time=utc_now()))
            s.execute(update(T.promotions).where(T.promotions.c.promotion_id == promotion_id).values(
                state=PROMOTION_APPROVED if approve else PROMOTION_REJECTED, decided_by=principal,
                decision_comment=comment, decision_time=utc_now()))
            if approve:
                version = load_version(s, self.store, p.name, p.version)
            return load_promotion(s, promotion_id), version

    def list_promotions(self, *, name: str = "", state: int = 0, size: int = 0,
                        token: str = "") -> tuple[list[Promotion], str]:
        page = PageRequest.parse("ListPromotions", size, token, {"name": name, "state": state}, key=int)
        p, m = T.promotions.c, T.registered_models.c
        stmt = (select(T.promotions, m.name).join(T.registered_models, p.model_id == m.id)
                .order_by(p.seq.desc()).limit(page.limit))
        if name:
            stmt = stmt.where(m.name == check_name(name))
        if state:
            stmt = stmt.where(p.state == state)
        if page.after is not None:
            stmt = stmt.where(p.seq < page.after)
        with self.db.read() as s:
            rows, next_token = page.cut(s.execute(stmt).all(), lambda r: r.seq)
        return [promotion_from_row(r) for r in rows], next_token
