"""Wiring of the inference service, and its process model.

`python -m services.inference` runs STRATA_INFERENCE_WORKERS serving processes (default: one
per core) that share the gRPC port through SO_REUSEPORT, so every core serves; the parent
supervises them (a crashed worker is restarted), serves their Prometheus metrics as one
(prometheus-client's multiprocess mode) and stops them on SIGTERM. With one worker the parent
serves by itself. The workers share the service database: policies, heartbeats, canary stats.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from inference import grpc_service_pb2, grpc_service_pb2_grpc
from strata.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.artifacts import open_artifact_store
from services.common.audit import AuditLog
from services.common.auth import mint_token
from services.common.db import Database
from services.common.server import Service
from services.common.settings import ServiceSettings, peer_address
from services.inference import tables
from services.inference.batch import BatchJobStore, BatchRunner
from services.inference.batching import BatchingConfig
from services.inference.endpoints import EndpointStore
from services.inference.models import ModelStore, RegistrySource
from services.inference.predlog import FileSink, PredictionLog
from services.inference.routing import Engine
from services.inference.runtime import default_intra_op_threads
from services.inference.server import InferenceServicer
from services.inference.access import V2_POLICIES
from services.inference.v2 import V2Servicer
from services.registry.client import RegistryClient

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("strata.inference")


@dataclass(frozen=True)
class InferenceConfig:
    """STRATA_INFERENCE_* knobs beyond the common service settings."""

    workers: int
    worker_id: str
    intra_op_threads: int
    device: str
    memory_budget_bytes: int
    batching: BatchingConfig
    prediction_log: str
    poll_seconds: float
    registry_addr: str
    registry_token: str | None

    @classmethod
    def from_env(cls, settings: ServiceSettings) -> InferenceConfig:
        env = os.environ
        workers = int(env.get("STRATA_INFERENCE_WORKERS", os.cpu_count() or 1))
        token = env.get("STRATA_INFERENCE_REGISTRY_TOKEN")
        if token is None and settings.auth == "enabled" and settings.jwt_secret is not None:
            # The service's own identity towards the registry: read-only.
            token = mint_token(settings.jwt_secret.get_secret_value(), "strata-inference", ["viewer"],
                               ttl_seconds=365 * 86400, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
        return cls(
            workers=max(1, workers),
            worker_id=env.get("STRATA_INFERENCE_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
            intra_op_threads=int(env.get("STRATA_INFERENCE_INTRA_OP_THREADS", default_intra_op_threads(workers))),
            device=env.get("STRATA_INFERENCE_DEVICE", "auto"),
            memory_budget_bytes=int(float(env.get("STRATA_INFERENCE_MEMORY_BUDGET_MB", "4096")) * (1 << 20)),
            batching=BatchingConfig(
                max_batch_size=int(env.get("STRATA_INFERENCE_MAX_BATCH_SIZE", "64")),
                max_queue_delay_us=int(env.get("STRATA_INFERENCE_MAX_QUEUE_DELAY_US", "0")),
                max_queue_size=int(env.get("STRATA_INFERENCE_MAX_QUEUE_SIZE", "1024"))),
            prediction_log=env.get("STRATA_INFERENCE_PREDICTION_LOG", ""),
            poll_seconds=float(env.get("STRATA_INFERENCE_POLL_SECONDS", "0.2")),
            registry_addr=peer_address("registry"),
            registry_token=token,
        )


def build_service(settings: ServiceSettings | None = None, config: InferenceConfig | None = None) -> Service:
    settings = settings or ServiceSettings.for_service("inference")
    config = config or InferenceConfig.from_env(settings)
    db = Database(settings.database_url)
    db.migrate(MIGRATIONS)
    home = (settings.home / "inference").resolve()
    source = RegistrySource(lambda: RegistryClient(config.registry_addr, config.registry_token))
    store = ModelStore(source, home / "cache", memory_budget_bytes=config.memory_budget_bytes,
                       intra_op_threads=config.intra_op_threads, device=config.device)
    if config.prediction_log == "disabled":
        log.warning("PREDICTION LOGGING IS DISABLED (STRATA_INFERENCE_PREDICTION_LOG=disabled)")
    log_dir = Path(config.prediction_log) if config.prediction_log not in ("", "disabled") else home / "predictions"
    sink = FileSink(log_dir / f"{config.worker_id}.binpb")
    predlog = PredictionLog(sink, log_dir / "spool", capacity=0 if config.prediction_log == "disabled" else 100_000)
    endpoints = EndpointStore(db)
    engine = Engine(store, endpoints, predlog, worker_id=config.worker_id, default_batching=config.batching,
                    poll_seconds=config.poll_seconds)
    jobs = BatchJobStore(db)
    runner = BatchRunner(jobs, store, open_artifact_store(settings.artifact_store_url), config.worker_id,
                         scratch_dir=home / "batch-scratch")
    ready = asyncio.Event()
    audit = AuditLog(db, tables.audit_events)
    background: list[asyncio.Task] = []

    async def recover_jobs(*, including_mine: bool) -> None:
        """Jobs whose serving process is gone (crash, restart) are marked failed and their
        leftovers removed, so a job never stays RUNNING forever. At start this process's own id
        counts as gone too: it may be reused from an earlier life."""
        live = {w for w, _, _ in await asyncio.to_thread(endpoints.live_workers, 10.0)}
        if including_mine:
            live.discard(config.worker_id)
        else:
            live.add(config.worker_id)
        await runner.recover(live.__contains__)

    async def watch_jobs() -> None:
        while True:
            await asyncio.sleep(10)
            try:
                await recover_jobs(including_mine=False)
            except Exception:
                log.exception("batch job recovery failed; retrying")

    async def start() -> None:
        await engine.start()
        await recover_jobs(including_mine=True)
        background.append(asyncio.get_running_loop().create_task(watch_jobs()))
        # Tail latency: everything loaded so far (modules, models, sessions) is long-lived, so
        # the collector need never scan it again (a full collection over it is a pause of tens of
        # ms); and a background thread (prediction log, heartbeats) may hold the GIL for at most
        # 0.5 ms before the event loop gets it back (the default is 5 ms).
        gc.collect()
        gc.freeze()
        sys.setswitchinterval(0.0005)
        ready.set()

    async def stop() -> None:
        ready.clear()
        for task in background:
            task.cancel()
        await runner.close()
        await engine.close()
        await store.close()
        predlog.close()
        db.dispose()

    inference_servicer = InferenceServicer(engine, jobs, runner)
    v2_servicer = V2Servicer(engine, ready)

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
        reuse_port=config.workers > 1,
    )


# -- the process model -------------------------------------------------------------------------
def _port_free(host: str, port: int) -> bool:
    """Checked without SO_REUSEPORT, so a port held by anyone (even with SO_REUSEPORT) counts."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_workers(workers: int) -> int:
    """Parent of the serving processes: start, supervise, serve the merged metrics, stop."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    from services.common import telemetry
    from services.common.supervisor import Child, Supervisor

    settings = ServiceSettings.for_service("inference")
    telemetry.setup_logging(settings.log_level, settings.log_format)
    if not _port_free(settings.host, settings.port):
        raise SystemExit(f"strata-inference: cannot listen on {settings.host}:{settings.port} (port taken)")
    # Migrate once here, so the workers do not race to create the schema.
    Database(settings.database_url).migrate(MIGRATIONS)
    metrics_dir = Path(tempfile.mkdtemp(prefix="strata-inference-metrics-"))
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=registry)
    children = [Child(f"inference-worker-{i}", [sys.executable, "-m", "services.inference"], None, env={
        "STRATA_INFERENCE_ROLE": "worker", "STRATA_INFERENCE_WORKER_ID": f"{socket.gethostname()}-w{i}",
        "STRATA_INFERENCE_METRICS_PORT": "0", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }) for i in range(workers)]
    sup = Supervisor(children)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sup.stop())
    log.info("starting serving processes", extra={"fields": {"workers": workers, "port": settings.port}})
    sup.start_all()
    ok = sup.watch()
    sup.stop_all(timeout=settings.grace_seconds + 5)
    for c in children:
        if c.proc is not None:
            mark_process_dead(c.proc.pid, str(metrics_dir))
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if ok else 1


def _die_with_parent() -> None:
    """A worker whose supervisor is killed (SIGKILL, OOM) must not keep serving on its own:
    Linux sends it SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            sys.exit(0)


def main() -> None:
    from services.common.server import run

    workers = int(os.environ.get("STRATA_INFERENCE_WORKERS", os.cpu_count() or 1))
    if os.environ.get("STRATA_INFERENCE_ROLE") == "worker":
        _die_with_parent()
        run(build_service)
    elif workers <= 1:
        run(build_service)
    else:
        sys.exit(run_workers(workers))
