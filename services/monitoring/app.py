"""Wiring of the monitoring service: settings -> database (migrated) -> artifact store, write-ahead
log and prediction store, reference store (with the registry as its model catalog), ground truth
-> facade -> servicer -> the shared server bootstrap; the alert rules (judged on the same reports,
and on the inference service's metrics), webhooks and the training trigger -> their facade ->
servicer; and the threads beside them: compaction, rule scheduling, webhook delivery, metrics
sampling."""

from __future__ import annotations

import threading
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict
from strata.monitoring.v1 import alerts_pb2, alerts_pb2_grpc, monitoring_pb2

from services.clients.registry import RegistryClient
from services.common.artifacts import LocalArtifactStore, open_artifact_store
from services.common.audit import AuditLog
from services.common.auth import service_token
from services.common.db import Database
from services.common.paths import Confinement
from services.common.server import Service
from services.common.settings import ServiceConfig, ServiceSettings, connect_host, listen_host, metrics_port, peer_address
from services.monitoring import tables
from services.monitoring.alert_conditions import ConditionJudge
from services.monitoring.alerts import AlertEvaluator, AlertStore
from services.monitoring.alerts_plane import AlertsPlane
from services.monitoring.alerts_server import AlertServicer
from services.monitoring.dataplane import MonitoringDataPlane
from services.monitoring.labels import GroundTruthStore
from services.monitoring.references import ReferenceStore
from services.monitoring.registry_source import RegistryCatalog
from services.monitoring.server import MonitoringServicer, register
from services.monitoring.serving_metrics import ServingMetrics
from services.monitoring.store import PredictionStore
from services.monitoring.training_trigger import TrainingScheduleTrigger
from services.monitoring.webhooks import Deliverer, WebhookStore

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
    training_token: SecretStr | None = Field(None, description="the service's identity towards the training "
                                                                "service, for alert rules' retraining triggers "
                                                                "(default: a minted developer token)")
    alert_tick_seconds: float = Field(1.0, gt=0, allow_inf_nan=False,
                                      description="how often the rules due for evaluation are looked for")
    webhook_max_attempts: int = Field(8, ge=1, le=100, description="attempts per webhook delivery before it fails")
    webhook_backoff_seconds: float = Field(5.0, gt=0, allow_inf_nan=False,
                                           description="wait after the first failed attempt (doubling after each)")
    webhook_max_backoff_seconds: float = Field(3600.0, gt=0, allow_inf_nan=False,
                                               description="the longest wait between attempts")
    webhook_timeout_seconds: float = Field(10.0, gt=0, allow_inf_nan=False, description="one POST's time limit")
    metrics_urls: str = Field("", description="comma-separated Prometheus /metrics URLs of the inference service "
                                              "for error-rate and latency rules (default: the inference service's "
                                              "metrics port on its host; 'none': no serving metrics)")
    metrics_scrape_seconds: float = Field(15.0, gt=0, allow_inf_nan=False,
                                          description="how often the serving metrics are sampled")
    metrics_retention_seconds: float = Field(6 * 3600.0, gt=0, allow_inf_nan=False,
                                             description="how long serving-metric samples are kept (the longest "
                                                         "window an error-rate or latency rule sees)")

    def serving_metric_urls(self) -> list[str]:
        if self.metrics_urls.strip() == "none":
            return []
        if self.metrics_urls.strip():
            return [u.strip() for u in self.metrics_urls.split(",") if u.strip()]
        return [f"http://{connect_host(listen_host('inference'))}:{metrics_port('inference')}/metrics"]


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

    webhooks = WebhookStore(db)
    deliverer = Deliverer(db, max_attempts=config.webhook_max_attempts, backoff=config.webhook_backoff_seconds,
                          max_backoff=config.webhook_max_backoff_seconds, timeout=config.webhook_timeout_seconds)
    alert_store = AlertStore(db, on_event=webhooks.queue)
    serving = ServingMetrics(config.serving_metric_urls(), retention=config.metrics_retention_seconds)
    trigger = TrainingScheduleTrigger(peer_address("training"), service_token(
        settings, "strata-monitoring", ["developer"], config.training_token))
    evaluator = AlertEvaluator(alert_store, ConditionJudge(predictions, references, plane.labels, serving), trigger)
    alerts = AlertServicer(AlertsPlane(alert_store, evaluator, webhooks, deliverer))

    stop = threading.Event()

    threads = [threading.Thread(target=target, args=args, name=name, daemon=True) for target, args, name in (
        (predictions.run_compactor, (stop, config.compact_seconds), "monitoring-compactor"),
        (evaluator.run, (stop, config.alert_tick_seconds), "monitoring-alerts"),
        (deliverer.run, (stop, config.alert_tick_seconds), "monitoring-webhooks"),
        *([(serving.run, (stop, config.metrics_scrape_seconds), "monitoring-serving-metrics")] if serving.urls else []),
    )]

    def start() -> None:
        predictions.open()  # the previous process's write-ahead log, into Parquet, before any call
        for thread in threads:
            thread.start()

    def finish() -> None:
        stop.set()
        predictions.due.set()
        deliverer.wake.set()
        for thread in threads:
            thread.join()
        deliverer.close()
        trigger.close()
        predictions.close()

    def register_all(server: object) -> None:
        register(servicer, server)
        alerts_pb2_grpc.add_AlertServiceServicer_to_server(alerts, server)

    return Service(
        settings=settings,
        descriptors=[monitoring_pb2.DESCRIPTOR.services_by_name["MonitoringService"],
                     alerts_pb2.DESCRIPTOR.services_by_name["AlertService"]],
        register=register_all,
        audit_log=AuditLog(db, tables.audit_events), on_start=[start],
        on_stop=[finish, catalog.close, db.dispose],
    )
