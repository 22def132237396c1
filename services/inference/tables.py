"""The inference service's schema (SQLAlchemy Core): endpoints and their policy revisions,
the serving processes' heartbeats, per-process canary statistics, and batch scoring jobs. The
database is what the serving processes share: a policy change is one new revision row that every
process applies."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import (
    BigInteger, Boolean, Column, DateTime, Index, Integer, MetaData, String, Table, Text, false,
)

from services.common.audit import audit_table
from services.common.idempotency import idempotency_table

MIGRATIONS = Path(__file__).parent / "migrations"  # the Alembic scripts of this schema

metadata = MetaData()


def _ts(name: str, nullable: bool = False) -> Column:
    return Column(name, DateTime(timezone=True), nullable=nullable)


endpoints = Table(
    "endpoints", metadata,
    Column("name", String(64), primary_key=True),
    Column("description", Text, nullable=False, default=""),
    Column("revision", BigInteger, nullable=False),
    Column("created_by", String(256), nullable=False),
    # Superseded by idempotency_keys (migration 0004); no longer written, kept so old rows read.
    Column("create_request_id", String(128), nullable=True, unique=True),
    _ts("create_time"), _ts("update_time"),
    # Routes returned traffic only to versions approved in the registry (governance.py).
    Column("production", Boolean, nullable=False, default=False, server_default=false()),
)

# One row per policy change. `policy` is the TrafficPolicy as JSON (entities.policy_to_json;
# a serialized protobuf message until migration 0005) with aliases already resolved to versions,
# so every process routes to exactly the same versions.
policy_revisions = Table(
    "policy_revisions", metadata,
    Column("endpoint", String(64), primary_key=True),
    Column("revision", BigInteger, primary_key=True),
    Column("policy", Text, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    _ts("create_time"),
)

# Each serving process says which revision of each endpoint it serves (JSON text) and when it
# last looked; a policy change waits until every live process serves the new revision.
workers = Table(
    "workers", metadata,
    Column("worker_id", String(64), primary_key=True),
    Column("pid", Integer, nullable=False),
    Column("applied", Text, nullable=False, default="{}"),
    Column("failures", Text, nullable=False, default="{}"),
    _ts("heartbeat"),
)

# Cumulative per-process figures of each target in a revision (rows are overwritten by their
# process); the canary guard sums them over processes. Only the newest revisions of each
# endpoint are kept (EndpointStore.prune_stats), so the table stays bounded.
target_stats = Table(
    "target_stats", metadata,
    Column("endpoint", String(64), primary_key=True),
    Column("revision", BigInteger, primary_key=True),
    Column("target", String(200), primary_key=True),  # "<model>:<version>[:shadow]"
    Column("worker_id", String(64), primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("histogram", Text, nullable=False),  # JSON list of counts per LATENCY_BUCKETS_MS
    _ts("update_time"),
)

audit_events = audit_table(metadata)

# Request ids of CreateEndpoint and CreateBatchJob: a retried call returns what the first one
# created (services/common/idempotency.py).
idempotency_keys = idempotency_table(metadata)

# Batch scoring jobs (batch_jobs/). `worker_id` is the serving process that runs the job: when it
# is gone, the job is marked failed (BatchJobStore.recover). rows_total is NULL until known.
batch_jobs = Table(
    "batch_jobs", metadata,
    Column("job_id", String(32), primary_key=True),  # time-ordered: newest first is job_id desc
    Column("model", String(128), nullable=False),
    Column("version", BigInteger, nullable=False),  # 0 until resolved
    Column("alias", String(64), nullable=False, default=""),
    Column("input_uri", Text, nullable=False),
    Column("output_uri", Text, nullable=False),
    Column("input_columns", Text, nullable=False, default="[]"),  # JSON list of column names
    Column("chunk_rows", Integer, nullable=False),
    Column("state", Integer, nullable=False),  # batch_jobs.store.BatchJobState (the proto's numbers)
    Column("rows_total", BigInteger, nullable=True),
    Column("rows_done", BigInteger, nullable=False, default=0),
    Column("error", Text, nullable=False, default=""),
    Column("created_by", String(256), nullable=False),
    Column("create_request_id", String(128), nullable=True, unique=True),  # superseded, as endpoints'
    Column("worker_id", String(64), nullable=False),
    _ts("create_time"), _ts("update_time"),
    Index("ix_batch_jobs_state", "state"),  # recover() looks for unfinished jobs
)
