"""The registry's entities: plain dataclasses (no protobuf) and the enum values they carry.
Their timestamps are aware UTC datetimes (services/common/timeutil.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from services.common.timeutil import as_utc, utc_now  # noqa: F401  (the domain modules import them from here)
from services.registry.onnx_check import Signature

# Enum values mirror strata.registry.v1 (kept as ints so the domain needs no protobuf).
STATUS_PENDING_UPLOAD, STATUS_READY = 1, 2
STAGE_NONE, STAGE_STAGING, STAGE_PRODUCTION, STAGE_ARCHIVED = 0, 1, 2, 3
PROMOTION_PENDING, PROMOTION_APPROVED, PROMOTION_REJECTED = 1, 2, 3

FRAMEWORKS = ("onnx", "sklearn", "xgboost", "lightgbm", "pytorch", "other")


@dataclass
class Model:
    name: str
    description: str = ""
    owner: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    latest_version: int = 0  # highest committed (READY) version; 0 when none
    aliases: dict[str, int] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass
class Lineage:
    mlflow_run_id: str = ""
    training_job_id: str = ""
    feature_views: list[str] = field(default_factory=list)
    dataset_hash: str = ""
    dataset_uri: str = ""
    feature_set: str = ""
    features: list[str] = field(default_factory=list)  # "{view}:{feature}", the model's input order


@dataclass
class Version:
    name: str
    version: int
    framework: str
    status: int
    stage: int = STAGE_NONE
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    signature: Signature = field(default_factory=Signature)
    lineage: Lineage = field(default_factory=Lineage)
    artifact_key: str = ""
    artifact_uri: str = ""
    filename: str = ""
    size_bytes: int = 0
    sha256: str = ""
    aliases: list[str] = field(default_factory=list)
    created_by: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None


@dataclass
class Upload:
    upload_id: str
    name: str
    version: int
    size_bytes: int
    received_bytes: int
    sha256: str
    filename: str


@dataclass
class Promotion:
    promotion_id: str
    name: str
    version: int
    alias: str
    state: int
    requested_by: str
    reason: str = ""
    decided_by: str = ""
    decision_comment: str = ""
    request_time: datetime | None = None
    decision_time: datetime | None = None
