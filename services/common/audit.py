"""The audit log: one row per call of a mutating RPC (principal, method, resource, request
id, time, outcome). Each service keeps it in its own database; the table is declared here
once and added to each service's metadata and migrations."""

from __future__ import annotations

import contextvars
import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import Message
from sqlalchemy import BigInteger, Column, DateTime, Index, Integer, MetaData, String, Table, Text, insert, select

from services.common.db import Database
from services.common.timeutil import as_utc

# The resource a call acts on: named from the request by the interceptor before the role check
# (request_resource, for mutating methods), then named more exactly by the servicer where it
# knows more (a created version's number); the interceptor writes the record.
current_resource: contextvars.ContextVar[str] = contextvars.ContextVar("strata_resource", default="")

MAX_RESOURCE = 512  # the column's size
_MAX_PART = 200  # one field's value in a name: a request may carry anything


@functools.lru_cache(maxsize=1024)  # one entry per method template
def _compile(template: str) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """A template as literal parts and field paths:
    `models/{name}` -> `(("models/", None), ("", ("name",)))`."""
    parts: list[tuple[str, tuple[str, ...] | None]] = []
    pos = 0
    for m in re.finditer(r"\{([^}]+)\}", template):
        if m.start() > pos:
            parts.append((template[pos:m.start()], None))
        parts.append(("", tuple(m.group(1).split("."))))
        pos = m.end()
    if pos < len(template):
        parts.append((template[pos:], None))
    return tuple(parts)


def request_resource(template: str, request: object) -> str:
    """The resource name a request asks to act on, from the method's template
    (`MethodPolicy.resource`): each `{field.path}` is the request's value, cut to a bounded
    length. "" without a template; without a request message (a request stream) the template
    only when it names no field (a fixed collection such as `monitoring/predictions`)."""
    if not template:
        return ""
    parts = _compile(template)
    if not isinstance(request, Message):
        return "".join(literal for literal, _ in parts) if all(path is None for _, path in parts) else ""
    out = []
    for literal, path in parts:
        if path is None:
            out.append(literal)
            continue
        value: object = request
        try:
            for name in path:
                value = getattr(value, name)
        except AttributeError:  # a template that does not fit the message: name what is known
            value = ""
        out.append(str(value)[:_MAX_PART])
    return "".join(out)[:MAX_RESOURCE]


def audit_table(metadata: MetaData) -> Table:
    return Table(
        "audit_events", metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("principal", String(256), nullable=False),
        Column("method", String(256), nullable=False),
        Column("resource", String(512), nullable=False),
        Column("request_id", String(128), nullable=False),
        Column("time", DateTime(timezone=True), nullable=False),
        Column("outcome", String(32), nullable=False),
        Column("message", Text, nullable=False),
        Index("ix_audit_events_resource", "resource"),
        Index("ix_audit_events_principal", "principal"),
    )


@dataclass(frozen=True)
class AuditRecord:
    principal: str
    method: str
    resource: str
    request_id: str
    outcome: str
    message: str = ""
    time: datetime | None = None
    id: int = 0


class AuditLog:
    def __init__(self, db: Database, table: Table) -> None:
        self._db = db
        self._t = table

    def record(self, rec: AuditRecord) -> None:
        with self._db.session() as s:
            s.execute(insert(self._t).values(
                principal=rec.principal, method=rec.method, resource=rec.resource[:MAX_RESOURCE],
                request_id=rec.request_id[:128], time=rec.time or datetime.now(UTC),
                outcome=rec.outcome, message=rec.message[:2000],
            ))

    def list(self, *, resource_prefix: str = "", principal: str = "", before_id: int | None = None,
             limit: int = 50) -> list[AuditRecord]:
        """Newest first; `before_id` continues a previous page."""
        t = self._t
        q = select(t).order_by(t.c.id.desc()).limit(limit)
        if resource_prefix:
            escaped = resource_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            q = q.where(t.c.resource.like(escaped + "%", escape="\\"))
        if principal:
            q = q.where(t.c.principal == principal)
        if before_id is not None:
            q = q.where(t.c.id < before_id)
        with self._db.read() as s:
            rows = s.execute(q).mappings().all()
        return [AuditRecord(
            id=r["id"], principal=r["principal"], method=r["method"], resource=r["resource"],
            request_id=r["request_id"], outcome=r["outcome"], message=r["message"],
            time=as_utc(r["time"]),
        ) for r in rows]
