"""Request ids of the create calls (CreateRegisteredModel, CreateModelVersion,
RequestPromotion): a retry with the same id, by the same principal, returns what the first call
created; the same id with a different payload is INVALID_ARGUMENT. A key is written in the
transaction that creates the resource, so a retry finds either both or neither."""

from __future__ import annotations

import re

from sqlalchemy import Connection, delete, insert, select

from services.common.errors import InvalidArgument
from services.registry import tables as T

from .entities import utc_now
from .fingerprint import fingerprint

_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}\Z")


def check_request_id(request_id: str) -> str:
    if request_id and not _REQUEST_ID_RE.match(request_id):
        raise InvalidArgument("request_id", "must be 1-128 printable ASCII characters without spaces")
    return request_id


def lookup(s: Connection, principal: str, method: str, request_id: str, payload: dict) -> str | None:
    """The resource a first call with this request id created, or None (no id, or not seen)."""
    if not request_id:
        return None
    k = T.idempotency_keys.c
    row = s.execute(select(k.request_hash, k.resource).where(
        k.principal == principal, k.method == method, k.request_id == request_id)).first()
    if row is None:
        return None
    if row.request_hash != fingerprint(payload):
        raise InvalidArgument("request_id", f"{request_id!r} was already used for a different request")
    return row.resource


def remember(s: Connection, principal: str, method: str, request_id: str, payload: dict,
             resource: str) -> None:
    if request_id:
        s.execute(insert(T.idempotency_keys).values(
            principal=principal, method=method, request_id=request_id, request_hash=fingerprint(payload),
            resource=resource, create_time=utc_now()))


def forget(s: Connection, method: str, resources: list[str]) -> None:
    """Drop the request ids of `method` that created `resources` (gone), so a retry starts afresh."""
    k = T.idempotency_keys.c
    s.execute(delete(T.idempotency_keys).where(k.method == method, k.resource.in_(resources)))
