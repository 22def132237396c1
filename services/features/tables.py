"""The feature service's schema (SQLAlchemy Core): entities and versioned feature views. Each
version keeps its full definition (JSON, records.py), so an old version stays readable after a
schema change; `feature_view_heads` points at the current one and
carries what search filters on."""

from __future__ import annotations

from sqlalchemy import (
    JSON, BigInteger, Column, DateTime, Index, MetaData, String, Table, Text,
)

from services.common.audit import audit_table

metadata = MetaData()


def _ts(name: str) -> Column:
    return Column(name, DateTime(timezone=True), nullable=False)


entities = Table(
    "entities", metadata,
    Column("name", String(64), primary_key=True),
    Column("spec", Text, nullable=False),  # the Entity as JSON (records.py)
    _ts("create_time"), _ts("update_time"),
)

feature_views = Table(
    "feature_views", metadata,
    Column("name", String(64), primary_key=True),
    Column("version", BigInteger, primary_key=True),
    Column("spec", Text, nullable=False),  # this version's FeatureView as JSON (records.py)
    Column("schema_hash", String(64), nullable=False),
    Column("created_by", String(256), nullable=False),
    _ts("create_time"), _ts("update_time"),
)

feature_view_heads = Table(
    "feature_view_heads", metadata,
    Column("name", String(64), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("owner", String(256), nullable=False, default=""),
    # ",user,merchant," so that "keyed by entity X" is one indexed-free LIKE on a short string.
    Column("entity_list", Text, nullable=False),
    # Name, description, feature names and descriptions, lower-cased: what free-text search reads.
    Column("search_text", Text, nullable=False),
    Column("tags", JSON, nullable=False, default=dict),
    Index("ix_feature_view_heads_owner", "owner"),
)

view_tags = Table(
    "view_tags", metadata,
    Column("name", String(64), primary_key=True),
    Column("key", String(128), primary_key=True),
    Column("value", String(1024), nullable=False),
    Index("ix_view_tags_key_value", "key", "value"),
)

# One row per finished materialization of a view version: where the next incremental run starts
# (the largest end_us), and the statistics of the rows the run materialized (Statistics as JSON,
# records.py; NULL when it found none). The newest run with statistics is
# monitoring's reference profile. Bounded: Materializer keeps the newest runs only.
materializations = Table(
    "materializations", metadata,
    Column("view", String(64), primary_key=True),
    Column("version", BigInteger, primary_key=True),
    Column("end_us", BigInteger, primary_key=True),
    Column("start_us", BigInteger, nullable=False),
    Column("rows", BigInteger, nullable=False),
    _ts("finish_time"),
    Column("stats", Text, nullable=True),
)

# Named lists of feature references (the FeatureSet as JSON, records.py): what a model reads.
feature_sets = Table(
    "feature_sets", metadata,
    Column("name", String(64), primary_key=True),
    Column("spec", Text, nullable=False),
    _ts("create_time"), _ts("update_time"),
)

# Training sets written by CreateTrainingSet: who wrote each place (only they may replace it), the
# request id that wrote it (retries answer the first result) and its lineage. PENDING while the
# file is being written: the row claims the place first, so two writers cannot both take it.
training_sets = Table(
    "training_sets", metadata,
    Column("uri", Text, primary_key=True),  # the checked place: an absolute path or an s3:// URI
    Column("state", String(16), nullable=False),  # PENDING, READY
    Column("created_by", String(256), nullable=False),
    Column("request_id", String(128), nullable=True, unique=True),
    Column("request_hash", String(64), nullable=False),
    Column("dataset", Text, nullable=True),  # the Dataset as JSON (records.py) once READY
    _ts("create_time"), _ts("update_time"),
)

audit_events = audit_table(metadata)
