"""Wiring of the monitoring service: settings -> database (migrated) -> artifact store, write-ahead
log and prediction store, reference store (with the registry as its model catalog), ground truth
-> facade -> servicer -> the shared server bootstrap; and the compaction thread beside them."""

from __future__ import annotations

import threading
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict
from strata.monitoring.v1 import monitoring_pb2

from services.clients.registry import RegistryClient
from services.common.artifacts import LocalArtifactStore, open_artifact_store
from services.common.audit import AuditLog
from services.common.auth import service_token
from services.common.db import Database
from services.common.paths import Confinement
from services.common.server import Service
from services.common.settings import ServiceConfig, ServiceSettings, peer_address
from services.monitoring import tables
from services.monitoring.dataplane import MonitoringDataPlane
from services.monitoring.labels import GroundTruthStore
from services.monitoring.references import ReferenceStore
from services.monitoring.registry_source import RegistryCatalog
from services.monitoring.server import MonitoringServicer, register
from services.monitoring.store import PredictionStore

MIGRATIONS = Path(__file__).parent / "migrations"


class MonitoringConfig(ServiceConfig):
    """STRATA_MONITORING_* knobs beyond the common service settings (typed; an unknown
    STRATA_MONITORING_ variable stops the service at start, naming it)."""

    model_config = SettingsConfigDict(env_prefix="STRATA_MONITORING_", extra="ignore")

    compact_seconds: float = Field(10.0, gt=0, allow_inf_nan=False,
                                   description="how often the write-ahead log is moved into Parquet files")
    compact_rows: int = Field(500_000, ge=1, description="pending rows that start a compaction early (ingestion "
                                                         "is refused, UNAVAILABLE, at 4x this many)")
    index_max_ids: int = Field(20_000_000, ge=1, description="prediction ids the idempotency index keeps in "
                                                             "memory (8 bytes each), over all partitions")
    registry_token: SecretStr | None = Field(None, description="the service's identity towards the registry "
                                                                "(default: a minted viewer token)")


def build_service(settings: ServiceSettings | None = None, config: MonitoringConfig | None = None) -> Service:
    settings = settings or ServiceSettings.for_service("monitoring")
    config = config or MonitoringConfig()
    db = Database(settings.database_url)
    db.migrate(MIGRATIONS)
    artifacts = open_artifact_store(settings.artifact_store_url)
    root = str(artifacts.root) if isinstance(artifacts, LocalArtifactStore) else artifacts.uri("x")[:-1]
    predictions = PredictionStore(db, artifacts, settings.home / "monitoring" / "wal",
                                  compact_rows=config.compact_rows, index_max_ids=config.index_max_ids)
    token = service_token(settings, "strata-monitoring", ["viewer"], config.registry_token)
    catalog = RegistryCatalog(lambda: RegistryClient(peer_address("registry"), token))
    references = ReferenceStore(db, artifacts, Confinement(root), catalog)
    plane = MonitoringDataPlane(predictions, references, GroundTruthStore(db, predictions))
    servicer = MonitoringServicer(plane)
    stop = threading.Event()
    compactor = threading.Thread(target=predictions.run_compactor, args=(stop, config.compact_seconds),
                                 name="monitoring-compactor", daemon=True)

    def start() -> None:
        predictions.open()  # the previous process's write-ahead log, into Parquet, before any call
        compactor.start()

    def finish() -> None:
        stop.set()
        predictions.due.set()
        compactor.join()
        predictions.close()

    return Service(
        settings=settings,
        descriptors=[monitoring_pb2.DESCRIPTOR.services_by_name["MonitoringService"]],
        register=lambda server: register(servicer, server),
        audit_log=AuditLog(db, tables.audit_events), on_start=[start],
        on_stop=[finish, catalog.close, db.dispose],
    )
