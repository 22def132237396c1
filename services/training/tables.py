"""The training service's schema (SQLAlchemy Core): jobs with their lease, the audit log and
the request ids of submits. Optuna keeps its studies in the same database, in its own tables
(`studies`, `trials`, ...); this service's Alembic history uses its own version table so the two
migration histories never meet (migrations/env.py)."""

from __future__ import annotations

from sqlalchemy import JSON, Boolean, Column, DateTime, Float, Index, Integer, MetaData, String, Table, Text

from services.common.audit import audit_table
from services.common.idempotency import idempotency_table

metadata = MetaData()
#: Alembic's version table for this service (Optuna's own migrations use `alembic_version`).
VERSION_TABLE = "training_alembic_version"


def _ts(name: str, nullable: bool = False) -> Column:
    return Column(name, DateTime(timezone=True), nullable=nullable)


jobs = Table(
    "training_jobs", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("spec", JSON, nullable=False),              # types.JobSpec.to_dict()
    Column("state", Integer, nullable=False),          # types.JobState
    Column("progress", JSON, nullable=False),          # types.Progress
    Column("result", JSON, nullable=True),             # types.Result, once finished
    Column("error", Text, nullable=False, default=""),
    Column("created_by", String(256), nullable=False),
    _ts("create_time"), _ts("start_time", True), _ts("end_time", True), _ts("update_time"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    # The lease: the worker running the job renews `lease_expires` while alive; a job whose lease
    # ran out is claimed again by another worker (resumed, not restarted: its study and MLflow run
    # carry on).
    Column("lease_owner", String(128), nullable=False, default=""),
    Column("lease_expires", Float, nullable=False, default=0.0),  # epoch seconds
    Column("mlflow_run_id", String(64), nullable=False, default=""),
    # Parallel trials: while the driver's search is open, up to `helper_slots` other workers join
    # its study (training_job_helpers holds their leases).
    Column("helper_slots", Integer, nullable=False, default=0),
    Index("ix_training_jobs_state_create", "state", "create_time"),
    Index("ix_training_jobs_create", "create_time"),
)

schedules = Table(
    "training_schedules", metadata,
    Column("schedule_id", String(32), primary_key=True),
    Column("description", Text, nullable=False, default=""),
    Column("cron", String(256), nullable=False, default=""),   # "" : runs only when triggered
    Column("spec", JSON, nullable=False),                       # types.JobSpec.to_dict()
    Column("paused", Boolean, nullable=False, default=False),
    _ts("next_run_time", True), _ts("last_run_time", True),
    Column("last_job_id", String(32), nullable=False, default=""),
    Column("created_by", String(256), nullable=False),
    _ts("create_time"),
    Index("ix_training_schedules_due", "paused", "next_run_time"),
)

helpers = Table(
    "training_job_helpers", metadata,
    Column("job_id", String(32), primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("lease_expires", Float, nullable=False),  # epoch seconds
)

audit_events = audit_table(metadata)
idempotency_keys = idempotency_table(metadata)
