"""The monitoring service's schema (SQLAlchemy Core): the catalog of the prediction files on the
artifact store, the reference of each model version, the ground truth by prediction id, alert
rules and their alerts, webhooks and their deliveries (an outbox), and the audit log. The prediction rows themselves are Parquet on the artifact store (store.py)."""

from __future__ import annotations

from sqlalchemy import (
    JSON, BigInteger, Boolean, Column, DateTime, Double, Index, Integer, LargeBinary, MetaData, String, Table, Text,
)

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

# Alert rules; `next_evaluation_time` is the schedule, claimed by compare-and-set so that one
# replica evaluates each tick.
alert_rules = Table(
    "monitoring_alert_rules", metadata,
    Column("name", String(128), primary_key=True),
    Column("description", Text, nullable=False),
    Column("endpoint", String(128), nullable=False),
    Column("model", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("condition", JSON, nullable=False),             # alerts.Condition as a dict
    Column("window_seconds", BigInteger, nullable=False),
    Column("interval_seconds", BigInteger, nullable=False),
    Column("training_schedule_id", String(128), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("created_by", String(256), nullable=False),
    _ts("create_time"), _ts("update_time"),
    _ts("next_evaluation_time"),
    _ts("last_evaluation_time", nullable=True),
    Column("last_evaluation_note", Text, nullable=False),
)

# One row per alert. `open_key` is "{rule}\n{target}" while the alert is open and NULL once
# resolved: its unique index is what keeps one open alert per rule and target, whichever replica
# evaluates.
alerts = Table(
    "monitoring_alerts", metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("alert_id", String(36), nullable=False, unique=True),
    Column("rule", String(128), nullable=False),
    Column("target", String(512), nullable=False),
    Column("open_key", String(700), nullable=True, unique=True),
    Column("state", String(16), nullable=False),           # firing, acknowledged, resolved
    Column("value", Double, nullable=False),
    Column("threshold", Double, nullable=False),
    Column("message", Text, nullable=False),
    _ts("open_time"), _ts("last_seen_time"),
    Column("acknowledged_by", String(256), nullable=False),
    _ts("acknowledge_time", nullable=True),
    Column("acknowledge_comment", Text, nullable=False),
    _ts("resolve_time", nullable=True),
    Column("training_job_id", String(128), nullable=False),
    Column("trigger_error", Text, nullable=False),
    Index("ix_monitoring_alerts_rule", "rule", "seq"),
)

webhooks = Table(
    "monitoring_webhooks", metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("webhook_id", String(36), nullable=False, unique=True),
    Column("url", String(2048), nullable=False),
    Column("secret", Text, nullable=False),                # the HMAC key (needed to sign: not hashed)
    Column("events", JSON, nullable=False),                # [event name]; empty: all
    Column("rules", JSON, nullable=False),                 # [rule name]; empty: all
    Column("description", Text, nullable=False),
    Column("created_by", String(256), nullable=False),
    _ts("create_time"),
)

# The outbox: a delivery is written in the transaction that changes the alert, so an event is
# never lost between the change and the POST; the deliverer claims due rows by compare-and-set.
webhook_deliveries = Table(
    "monitoring_webhook_deliveries", metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("delivery_id", String(36), nullable=False, unique=True),
    Column("webhook_id", String(36), nullable=False),
    Column("alert_id", String(36), nullable=False),
    Column("event", String(16), nullable=False),
    Column("payload", Text, nullable=False),               # the JSON body, fixed when queued
    Column("state", String(16), nullable=False),           # pending, delivered, failed
    Column("attempts", Integer, nullable=False),
    Column("last_status", Integer, nullable=False),
    Column("last_error", Text, nullable=False),
    _ts("create_time"), _ts("next_attempt_time"),
    Index("ix_monitoring_deliveries_due", "state", "next_attempt_time"),
    Index("ix_monitoring_deliveries_webhook", "webhook_id", "seq"),
)

audit_events = audit_table(metadata)
