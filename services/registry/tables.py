"""The registry's schema (SQLAlchemy Core). Alembic migrations in migrations/ create it."""

from __future__ import annotations

from sqlalchemy import (
    JSON, BigInteger, Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table, Text,
    UniqueConstraint,
)

from services.common.audit import audit_table
from services.common.idempotency import idempotency_table

metadata = MetaData()
_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


def _ts(name: str, nullable: bool = False) -> Column:
    return Column(name, DateTime(timezone=True), nullable=nullable)


registered_models = Table(
    "registered_models", metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("description", Text, nullable=False, default=""),
    Column("owner", String(256), nullable=False, default=""),
    # The counter that hands out version numbers: the highest ever issued, committed or not.
    # Never decremented, so numbers are never reused. The API's latest_version is the highest
    # committed (READY) version, computed from model_versions (domain/rows.py, models_from_rows).
    Column("last_issued_version", Integer, nullable=False, default=0),
    _ts("create_time"), _ts("update_time"),
)

# Tags in their own table so search by tag is an indexed SQL query on every backend.
model_tags = Table(
    "model_tags", metadata,
    Column("model_id", _ID, ForeignKey("registered_models.id", ondelete="CASCADE"), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", String(1024), nullable=False),
    Index("ix_model_tags_key_value", "key", "value"),
)

model_versions = Table(
    "model_versions", metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("model_id", _ID, ForeignKey("registered_models.id", ondelete="CASCADE"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("framework", String(32), nullable=False),
    Column("status", Integer, nullable=False),
    Column("stage", Integer, nullable=False, default=0),
    Column("description", Text, nullable=False, default=""),
    Column("tags", JSON, nullable=False, default=dict),
    Column("metrics", JSON, nullable=False, default=dict),
    Column("signature", JSON, nullable=False, default=dict),
    Column("lineage", JSON, nullable=False, default=dict),
    Column("artifact_key", String(1024), nullable=False, default=""),
    Column("filename", String(255), nullable=False, default=""),
    Column("size_bytes", BigInteger, nullable=False, default=0),
    Column("sha256", String(64), nullable=False, default=""),
    Column("created_by", String(256), nullable=False),
    _ts("create_time"), _ts("update_time"),
    UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
    Index("ix_model_versions_status_stage", "status", "stage"),
)

aliases = Table(
    "aliases", metadata,
    Column("model_id", _ID, ForeignKey("registered_models.id", ondelete="CASCADE"), primary_key=True),
    Column("alias", String(64), primary_key=True),
    # RESTRICT: the database itself refuses to drop a version an alias points at.
    Column("version_id", _ID, ForeignKey("model_versions.id", ondelete="RESTRICT"), nullable=False),
    Column("updated_by", String(256), nullable=False),
    _ts("update_time"),
    Index("ix_aliases_version_id", "version_id"),
)

uploads = Table(
    "uploads", metadata,
    Column("upload_id", String(64), primary_key=True),
    Column("version_id", _ID, ForeignKey("model_versions.id", ondelete="CASCADE"), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("received_bytes", BigInteger, nullable=False, default=0),
    Column("next_part", Integer, nullable=False, default=0),
    Column("sha256", String(64), nullable=False),
    Column("filename", String(255), nullable=False),
    # Set just before the staged bytes are published, so recovery can find an object that a
    # crash left published but not yet recorded on the version.
    Column("publish_key", String(1024), nullable=True),
    Column("created_by", String(256), nullable=False),
    _ts("create_time"), _ts("update_time"),
)

promotions = Table(
    "promotions", metadata,
    Column("seq", _ID, primary_key=True, autoincrement=True),
    Column("promotion_id", String(64), nullable=False, unique=True),
    Column("model_id", _ID, ForeignKey("registered_models.id", ondelete="CASCADE"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("alias", String(64), nullable=False),
    Column("state", Integer, nullable=False),
    Column("requested_by", String(256), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("decided_by", String(256), nullable=False, default=""),
    Column("decision_comment", Text, nullable=False, default=""),
    _ts("request_time"), _ts("decision_time", nullable=True),
)

# Client request ids of create calls: a retried call returns what the first one created
# (services/common/idempotency.py).
idempotency_keys = idempotency_table(metadata)

audit_events = audit_table(metadata)
