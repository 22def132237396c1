"""The monitoring service's schema (SQLAlchemy Core): the catalog of the prediction files on the
artifact store, the reference of each model version, the ground truth by prediction id, and the
audit log. The prediction rows themselves are Parquet on the artifact store (store.py)."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Double, Index, LargeBinary, MetaData, String, Table, Text

from services.common.audit import audit_table

metadata = MetaData()


def _ts(name: str, nullable: bool = False) -> Column:
    return Column(name, DateTime(timezone=True), nullable=nullable)


# One row per Parquet file of predictions: what a query needs to pick files without listing the
# store (partition, time range) and to read them as one table (the file's Arrow schema).
prediction_files = Table(
    "monitoring_prediction_files", metadata,
    Column("key", String(1024), primary_key=True),        # artifact store key
    Column("endpoint", String(128), nullable=False),       # "" for a direct model call
    Column("model", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("day", String(10), nullable=False),             # UTC date of the rows, YYYY-MM-DD
    Column("rows", BigInteger, nullable=False),
    _ts("min_time"), _ts("max_time"),
    Column("arrow_schema", LargeBinary, nullable=False),   # pyarrow Schema.serialize()
    _ts("create_time"),
    Index("ix_monitoring_files_version_day", "model", "version", "day"),
    Index("ix_monitoring_files_endpoint_day", "endpoint", "day"),
)

references = Table(
    "monitoring_references", metadata,
    Column("model", String(128), primary_key=True),
    Column("version", BigInteger, primary_key=True),
    Column("table_uri", Text, nullable=False),
    Column("from_lineage", Boolean, nullable=False),
    Column("table_sha256", String(64), nullable=False),
    Column("rows", BigInteger, nullable=False),
    Column("columns", JSON, nullable=False),               # [ReferenceColumn as a dict], features first
    Column("profile_key", String(1024), nullable=False),   # the profile (.npz) on the artifact store
    Column("created_by", String(256), nullable=False),
    _ts("create_time"),
)

ground_truth = Table(
    "monitoring_ground_truth", metadata,
    Column("prediction_id", String(256), primary_key=True),
    Column("number", Double, nullable=True),               # one of number and category is set
    Column("category", Text, nullable=True),
    _ts("time"),                                           # when the outcome was observed
    _ts("report_time"),
    Column("reported_by", String(256), nullable=False),
)

audit_events = audit_table(metadata)
