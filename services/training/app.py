"""Wiring of the training service: settings -> database (migrated) -> job store, MLflow tracker,
registry and feature store clients -> facade -> servicer -> the shared server bootstrap; and the
worker processes (worker.py) it keeps running beside the server."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict
from strata.training.v1 import training_pb2, training_pb2_grpc

from services.clients.registry import RegistryClient
from services.common.audit import AuditLog
from services.common.auth import service_token
from services.common.db import Database
from services.common.paths import Confinement
from services.common.process_tuning import threads_per_process
from services.common.server import Service
from services.common.settings import ServiceConfig, ServiceSettings, peer_address
from services.common.supervisor import Child, Supervisor
from services.training import prom_metrics, tables
from services.training.dataplane import TrainingDataPlane
from services.training.feature_source import GrpcFeatureSource
from services.training.jobs import JobStore
from services.training.ray_trials import RayTrials, helper_env
from services.training.registry_target import GrpcModelRegistry
from services.training.runner import JobRunner
from services.training.server import TrainingServicer
from services.training.tracking import Tracker

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("strata.training")


class TrainingConfig(ServiceConfig):
    """STRATA_TRAINING_* knobs beyond the common service settings (typed; an unknown
    STRATA_TRAINING_ variable stops the service at start, naming it)."""

    model_config = SettingsConfigDict(env_prefix="STRATA_TRAINING_", extra="ignore")

    workers: int = Field(1, ge=0, le=64, description="worker processes this service starts (0: workers run elsewhere)")
    threads_per_worker: int = Field(0, ge=0, description="numeric threads per worker (0: cores / workers)")
    lease_seconds: float = Field(30.0, gt=1, allow_inf_nan=False, description="a dead worker's job is resumed "
                                                                              "after this long")
    poll_seconds: float = Field(1.0, gt=0, allow_inf_nan=False, description="how often an idle worker looks for jobs")
    schedule_tick_seconds: float = Field(5.0, gt=0, allow_inf_nan=False, description="how often due schedules "
                                                                                   "are submitted")
    mlflow_tracking_uri: str = Field("", description="MLflow backend (default sqlite under STRATA_HOME)")
    mlflow_artifact_root: str = Field("", description="where runs' artifacts go (default <artifact store>/mlflow)")
    study_storage_url: str = Field("", description="Optuna's storage (default: this service's database)")
    registry_token: SecretStr | None = Field(None, description="the service's identity towards the registry and "
                                                                "the feature store (default: minted developer token)")
    ray_address: str = Field("", description="a Ray cluster's address (host:port of its head) where parallel "
                                             "trials also run (empty: local workers only); see ray_trials.py")

    def tracking_uri(self, settings: ServiceSettings) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(settings.home / 'mlflow.db').resolve()}"

    def artifact_root(self, settings: ServiceSettings) -> str:
        if self.mlflow_artifact_root:
            return self.mlflow_artifact_root
        store = settings.artifact_store_url
        return store.rstrip("/") + "/mlflow" if "://" in store else str(Path(store).resolve() / "mlflow")

    def credentials(self, settings: ServiceSettings) -> str | None:
        """Registering models and writing training sets need the developer role."""
        return service_token(settings, "strata-training", ["developer"], self.registry_token)


def _confinement(settings: ServiceSettings) -> Confinement:
    return Confinement(settings.artifact_store_url)


def _features(settings: ServiceSettings, config: TrainingConfig) -> GrpcFeatureSource:
    return GrpcFeatureSource(peer_address("features"), config.credentials(settings))


def build_runner(settings: ServiceSettings, config: TrainingConfig, threads: int = 1) -> JobRunner:
    """What a worker process runs jobs with."""
    db = Database(settings.database_url)
    db.migrate(MIGRATIONS)
    token = config.credentials(settings)
    registry = GrpcModelRegistry(lambda: RegistryClient(peer_address("registry"), token))
    workdir = settings.home / "training" / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    # A helper stops within a heartbeat (lease / 6) of its job's end; Ray tasks still there after
    # lease / 3 are cancelled.
    ray = RayTrials(config.ray_address, helper_env(settings, config), threads, config.lease_seconds / 3) \
        if config.ray_address else None
    return JobRunner(JobStore(db, config.lease_seconds), Tracker(config.tracking_uri(settings),
                                                                 config.artifact_root(settings)),
                     registry, _confinement(settings), config.study_storage_url or settings.database_url,
                     features=_features(settings, config), threads=threads, workdir=workdir, ray_trials=ray)


def worker_children(settings: ServiceSettings, config: TrainingConfig) -> list[Child]:
    threads = config.threads_per_worker or threads_per_process(config.workers)
    env = {"STRATA_TRAINING_THREADS_PER_WORKER": str(threads), "STRATA_TRAINING_WORKERS": str(config.workers)}
    return [Child(f"training-worker-{i}", [sys.executable, "-m", "services.training.worker"], env=env)
            for i in range(config.workers)]


def build_service(settings: ServiceSettings | None = None, config: TrainingConfig | None = None) -> Service:
    settings = settings or ServiceSettings.for_service("training")
    config = config or TrainingConfig()
    db = Database(settings.database_url)
    db.migrate(MIGRATIONS)
    prom_metrics.watch(db)  # jobs per state and trials, read at each scrape
    jobs = JobStore(db, config.lease_seconds)
    plane = TrainingDataPlane(jobs, Tracker(config.tracking_uri(settings), config.artifact_root(settings)),
                              _confinement(settings), _features(settings, config))
    audit = AuditLog(db, tables.audit_events)
    servicer = TrainingServicer(plane)
    supervisor = Supervisor(worker_children(settings, config)) if config.workers else None
    ticker: list[asyncio.Task] = []

    async def tick_forever() -> None:
        while True:
            try:
                submitted = await plane.tick()
                if submitted:
                    log.info("scheduled jobs submitted", extra={"fields": {"jobs": submitted}})
            except Exception:  # a database hiccup: the next tick tries again
                log.exception("schedule tick failed")
            await asyncio.sleep(config.schedule_tick_seconds)

    def start_ticker() -> None:
        ticker.append(asyncio.ensure_future(tick_forever()))

    def stop_ticker() -> None:
        for task in ticker:
            task.cancel()
    on_start, on_stop = [start_ticker], [stop_ticker, db.dispose, plane.features.close]
    if supervisor is not None:
        import threading

        def start_workers() -> None:
            supervisor.start_all()
            threading.Thread(target=supervisor.watch, name="training-workers", daemon=True).start()
        on_start.append(start_workers)
        on_stop.insert(0, lambda: (supervisor.stop(), supervisor.stop_all()))
    return Service(
        settings=settings,
        descriptors=[training_pb2.DESCRIPTOR.services_by_name["TrainingService"]],
        register=lambda server: training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server),
        audit_log=audit, on_start=on_start, on_stop=on_stop,
    )
