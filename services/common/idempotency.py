"""Idempotent creates by request id, one way for every service.

A create RPC takes `request_id` (optional; 1-128 printable ASCII characters without spaces). A
retry with the same id, by the same principal, returns what the first call created; the same id
with a different payload is INVALID_ARGUMENT naming request_id. The payload is everything in the
request that the create depends on, as the request gave it (before aliases are resolved), so a
retry is recognised however the world changed in between.

Each service keeps its request ids in its own database, in a table declared here once
(`idempotency_table`, added to the service's metadata and migrations, as the audit table is).
A key is written in the transaction that creates the resource (`RequestIds.remember` on that
connection), so a retry finds either both or neither; `forget` drops the keys of resources that
are gone, so a retry after a delete creates afresh.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Connection, DateTime, MetaData, String, Table, delete, insert, select

from services.common.errors import InvalidArgument, quote
from services.common.fingerprint import fingerprint

MAX_REQUEST_ID = 128
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}\Z")


def check_request_id(request_id: str, field: str = "request_id") -> str:
    """"" (none given) or a bounded id; anything else is INVALID_ARGUMENT naming the field."""
    if request_id and not _REQUEST_ID_RE.match(request_id):
        raise InvalidArgument(field, f"must be 1-{MAX_REQUEST_ID} printable ASCII characters without spaces")
    return request_id


def reused(request_id: str, field: str = "request_id") -> InvalidArgument:
    """The error for an id that a first call used with a different payload."""
    return InvalidArgument(field, f"{quote(request_id)} was already used for a different request")


def idempotency_table(metadata: MetaData) -> Table:
    """The `idempotency_keys` table in a service's metadata: one row per (principal, method,
    request id), with the payload's digest and the name of the resource the first call made."""
    return Table(
        "idempotency_keys", metadata,
        Column("principal", String(256), primary_key=True),
        Column("method", String(128), primary_key=True),
        Column("request_id", String(128), primary_key=True),
        Column("request_hash", String(64), nullable=False),
        Column("resource", String(512), nullable=False),
        Column("create_time", DateTime(timezone=True), nullable=False),
    )


class RequestIds:
    """The request ids of one service's creates, kept in its `idempotency_keys` table. Every
    method takes the connection of the caller's transaction."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def lookup(self, c: Connection, principal: str, method: str, request_id: str, payload: Any) -> str | None:
        """The resource a first call with this id created, or None (no id, or not seen yet);
        INVALID_ARGUMENT naming request_id when that call carried a different payload."""
        if not request_id:
            return None
        k = self.table.c
        row = c.execute(select(k.request_hash, k.resource).where(
            k.principal == principal, k.method == method, k.request_id == request_id)).first()
        if row is None:
            return None
        if row.request_hash != fingerprint(payload):
            raise reused(request_id)
        return row.resource

    def remember(self, c: Connection, principal: str, method: str, request_id: str, payload: Any,
                 resource: str) -> None:
        """Record that this id created `resource` (nothing without an id). Call it in the
        transaction that creates the resource; a concurrent first call with the same id makes
        this insert fail (the primary key), and that transaction rolls back."""
        if request_id:
            c.execute(insert(self.table).values(
                principal=principal, method=method, request_id=request_id, request_hash=fingerprint(payload),
                resource=resource, create_time=datetime.now(UTC)))

    def forget(self, c: Connection, method: str, resources: list[str]) -> None:
        """Drop the ids of `method` that created `resources` (gone), so a retry starts afresh."""
        if resources:
            k = self.table.c
            c.execute(delete(self.table).where(k.method == method, k.resource.in_(resources)))
