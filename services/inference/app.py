"""Wiring of the inference service. Its serving processes (services/common/workers.py: one per
core on one port by default) share the service database: policies, heartbeats, canary stats."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from strata.inference.v1 import inference_pb2, inference_pb2_grpc
from strata.kserve.v2 import grpc_service_pb2, grpc_service_pb2_grpc

from services.clients.registry import RegistryClient
from services.common.artifacts import open_artifact_store
from services.common.audit import AuditLog
from services.common.db import Database
from services.common.kserve_access import V2_POLICIES
from services.common.server import Service
from services.common.settings import ServiceSettings, peer_address
from services.common.workers import shares_port
from services.inference import batching, tables
from services.inference.batch_jobs import BatchJobStore, BatchRunner
from services.inference.config import InferenceConfig
from services.inference.dataplane import DataPlane
from services.inference.endpoints import EndpointStore
from services.inference.entity_features import EntityFeatures
from services.inference.feature_client import GrpcFeatureReader
from services.inference.model_store import ModelStore
from services.inference.monitoring_sink import MonitoringSink
from services.inference.predlog import FileSink, PredictionLog, Sink
from services.inference.predlog_format import Encoder
from services.inference.registry_source import RegistrySource
from services.inference.routing import Engine
from services.inference.server import InferenceServicer
from services.inference.v2 import V2Servicer

log = logging.getLogger("strata.inference")


def prediction_sink(config: InferenceConfig, settings: ServiceSettings, log_dir: Path, worker: str) -> Sink:
    """The monitoring service when configured, else a local file per serving process. With
    monitoring, no local file is kept besides the spool: monitoring holds the rows durably once it
    answers, and the file would grow without bound beside it."""
    address = config.monitoring_address
    if address is None:
        return FileSink(log_dir / f"{worker}.binpb")
    log.info("prediction log goes to the monitoring service", extra={"fields": {"monitoring": address}})
    rejected = FileSink(log_dir / "rejected" / f"{worker}.binpb")  # records monitoring refuses as invalid
    return MonitoringSink(address, config.monitoring_credentials(settings), rejected,
                          timeout=config.monitoring_timeout_seconds)


def build_service(settings: ServiceSettings | None = None, config: InferenceConfig | None = None) -> Service:
    settings = settings or ServiceSettings.for_service("inference")
    config = config or InferenceConfig()
    batching.INLINE_SECONDS = config.inline_us / 1e6  # process-wide, read when a model's batcher is made
    worker = config.worker_id
    registry_addr, registry_token = peer_address("registry"), config.registry_credentials(settings)
    db = Database(settings.database_url)
    db.migrate(tables.MIGRATIONS)
    home = (settings.home / "inference").resolve()
    source = RegistrySource(lambda: RegistryClient(registry_addr, registry_token))
    # Serving by entity key reads the feature service with the same identity.
    features = GrpcFeatureReader(peer_address("features"), registry_token)
    store = ModelStore(source, home / "cache", memory_budget_bytes=config.memory_budget_bytes,
                       intra_op_threads=config.threads, device=config.device)
    if config.prediction_log == "disabled":
        log.warning("PREDICTION LOGGING IS DISABLED (STRATA_INFERENCE_PREDICTION_LOG=disabled)")
    log_dir = Path(config.prediction_log) if config.prediction_log not in ("", "disabled") else home / "predictions"
    sink = prediction_sink(config, settings, log_dir, worker)
    # To monitoring, batches are sent every 250 ms rather than every 20 ms: each one is a stream that
    # monitoring fsyncs and audits, and at 20 ms those costs cut serving throughput by more than half
    # on two cores (tests/bench/monitoring_delivery.py; docs/monitoring.md).
    predlog = PredictionLog(sink, log_dir / "spool", encode=Encoder().encode,
                            capacity=0 if config.prediction_log == "disabled" else 100_000,
                            interval=0.25 if isinstance(sink, MonitoringSink) else 0.02)
    endpoints = EndpointStore(db, keep_revisions=config.stats_keep_revisions)
    engine = Engine(store, endpoints, predlog, worker_id=worker, default_batching=config.batching,
                    poll_seconds=config.poll_seconds)
    jobs = BatchJobStore(db)
    runner = BatchRunner(jobs, store, open_artifact_store(settings.artifact_store_url), worker,
                         scratch_dir=home / "batch-scratch", local_paths=config.local_batch_paths)
    ready = asyncio.Event()
    audit = AuditLog(db, tables.audit_events)
    background: list[asyncio.Task] = []

    async def recover_jobs(*, including_mine: bool) -> None:
        """Jobs whose serving process is gone (crash, restart) are marked failed and their
        leftovers removed, so a job never stays RUNNING forever. At start this process's own id
        counts as gone too: it may be reused from an earlier life."""
        live = {w for w, _, _ in await asyncio.to_thread(endpoints.live_workers, 10.0)}
        if including_mine:
            live.discard(worker)
        else:
            live.add(worker)
        await runner.recover(live.__contains__)

    async def watch_jobs() -> None:
        while True:
            await asyncio.sleep(10)
            try:
                await recover_jobs(including_mine=False)
            except Exception:
                log.exception("batch job recovery failed; retrying")

    async def prune_stats() -> None:
        """Every serving process sweeps now and then (one cheap statement per table; any process
        may, none depends on another): the per-target statistics of old revisions and deleted
        endpoints, and the heartbeats of processes long gone."""
        while True:
            await asyncio.sleep(config.stats_prune_seconds)
            try:
                stats, workers = await asyncio.to_thread(endpoints.prune_stats)
                if stats or workers:
                    log.debug("pruned", extra={"fields": {"target_stats": stats, "workers": workers}})
            except Exception:
                log.exception("pruning endpoint statistics failed; retrying")

    async def start() -> None:
        await engine.start()
        await recover_jobs(including_mine=True)
        loop = asyncio.get_running_loop()
        background.append(loop.create_task(watch_jobs()))
        background.append(loop.create_task(prune_stats()))
        ready.set()  # (the process-wide latency settings follow: services/common/process_tuning.py)

    async def stop() -> None:
        ready.clear()
        for task in background:
            task.cancel()
        await runner.close()
        await engine.close()
        await store.close()
        await features.close()
        # (long enough for a delivery under way to finish, or fail and be spooled: never cut short)
        predlog.close(timeout=config.monitoring_timeout_seconds + 5)
        if isinstance(sink, MonitoringSink):
            sink.close()
        db.dispose()

    plane = DataPlane(engine, ready, EntityFeatures(features))
    inference_servicer = InferenceServicer(plane, jobs, runner)
    v2_servicer = V2Servicer(plane)

    def register(server) -> None:  # noqa: ANN001
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference_servicer, server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(v2_servicer, server)

    return Service(
        settings=settings,
        descriptors=[inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]],
        register=register,
        audit_log=audit,
        on_start=[start],
        on_stop=[stop],
        extra_services=[grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name],
        extra_policies=V2_POLICIES,
        reuse_port=shares_port("inference"),
    )
