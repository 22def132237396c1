"""Parallel trials on a Ray cluster (STRATA_TRAINING_RAY_ADDRESS).

A job with `hpo.parallelism` P > 1 opens P - 1 helper slots (jobs.py); with a Ray address set, the
worker that drives the job also submits P - 1 Ray tasks. Each claims a slot of that job and runs
`JobRunner.run_helper` in a Ray worker process, the code an idle local worker runs with a slot: the
same lease and heartbeats, the same Optuna study (in the database), MLflow child runs, pruning and
cancel. Idle local workers still take slots too; a task that finds none free (or the search
closed) returns at once. When the job ends, tasks still queued or running after a grace are
cancelled (`ray.cancel`).

Ray starts a helper's process with the driver's settings as its environment (machine-relative
defaults resolved: databases, tracking URI, artifact store, the service's token, peer addresses)
and its thread sizing, so a Ray node needs the same `strata[training]` install and reach to the
same database, tracking store and artifact store as any training worker. A task asks for
`num_cpus` = the driver's threads per worker (at most the largest node's CPUs). The process stays
with Ray for later tasks of the same environment, its runner built once, as a local worker's.

Ray unreachable when a job starts: the job runs without it (the driver and any idle local workers),
with a warning in the log; parallel trials are a speed-up, and the trial count holds without them.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from services.common.settings import ServiceSettings, peer_address

if TYPE_CHECKING:
    from services.training.app import TrainingConfig
    from services.training.runner import JobRunner

log = logging.getLogger("strata.training.ray")
CONNECT_TIMEOUT = 5.0  # seconds; ray.init itself waits minutes for a head that is not there
PASSED_ON = ("STRATA_", "MLFLOW_", "AWS_")  # the settings and credentials a worker reads from its environment


def helper_env(settings: ServiceSettings, config: TrainingConfig) -> dict[str, str]:
    """The settings a Ray helper starts with: this process's, with what defaults to this machine's
    working directory resolved, and the token it presents to the feature store."""
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}
    for name, value in config.model_dump().items():  # however they were given (environment or code)
        if value is not None:
            secret = isinstance(value, SecretStr)
            env[f"STRATA_TRAINING_{name.upper()}"] = value.get_secret_value() if secret else str(value)
    env |= {
        "STRATA_HOME": str(settings.home.resolve()),
        "STRATA_ARTIFACT_STORE": settings.artifact_store_url,
        "STRATA_TRAINING_DATABASE_URL": settings.database_url,
        "STRATA_TRAINING_STUDY_STORAGE_URL": config.study_storage_url or settings.database_url,
        "STRATA_TRAINING_MLFLOW_TRACKING_URI": config.tracking_uri(settings),
        "STRATA_TRAINING_MLFLOW_ARTIFACT_ROOT": config.artifact_root(settings),
        "STRATA_FEATURES_ADDR": peer_address("features"),
        "STRATA_REGISTRY_ADDR": peer_address("registry"),
    }
    token = config.credentials(settings)
    if token:
        env["STRATA_TRAINING_REGISTRY_TOKEN"] = token
    return env


def run_helper_task(job_id: str) -> str:
    """In a Ray worker: one helper of the job's search, as an idle local worker would run it."""
    runner = _runner()
    helper = runner.store.claim_helper(runner.worker, job_id=job_id)
    if helper is None:
        return f"{runner.worker}: no free slot"
    runner.run_helper(helper)
    return f"{runner.worker}: slot {helper.slot}"


@functools.cache
def _runner() -> JobRunner:
    """The Ray worker process's runner, built once as a local worker builds its own: Ray started the
    process with the environment of the tasks it serves (runtime_env), so it is the same for every
    later task, and a warm process joins the next job's search without the training stack's
    seconds of imports."""
    from services.common import telemetry
    from services.training.app import TrainingConfig, build_runner

    settings = ServiceSettings.for_service("training")
    telemetry.setup_logging(settings.log_level, settings.log_format)
    config = TrainingConfig()
    runner = build_runner(settings, config, threads=config.threads_per_worker)
    runner.worker = f"ray:{socket.gethostname()}:{os.getpid()}"  # recorded on each trial it runs
    return runner


class RayTrials:
    """A worker's connection to the Ray cluster (made at the first parallel job) and the helper
    tasks it submitted, by job."""

    def __init__(self, address: str, env: dict[str, str], threads: int, grace_seconds: float) -> None:
        self.address, self.env, self.threads, self.grace = address, env, threads, grace_seconds
        self._tasks: dict[str, list] = {}

    def submit(self, job_id: str, helpers: int) -> list:
        """`helpers` Ray tasks joining the job's open search (their object refs; none when Ray is
        unreachable)."""
        try:
            ray = self._connect()
            largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
            cpus = max(1, min(self.threads, int(largest)))  # more than any node has would never be scheduled
            # The settings and thread sizing are the environment Ray starts the worker process with,
            # before numpy loads (as worker.main sets them): OpenMP, torch and n_jobs get the task's
            # CPUs, BLAS one. max_retries=0: a lost task's slot is freed by its lease, and the
            # trials it would have run are run by the others.
            threads = {"STRATA_TRAINING_THREADS_PER_WORKER": str(cpus), "OMP_NUM_THREADS": str(cpus),
                       "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            task = ray.remote(run_helper_task).options(
                name=f"strata-trials-{job_id}", num_cpus=cpus, max_retries=0,
                runtime_env={"env_vars": {**self.env, **threads}})
            tasks = self._tasks[job_id] = [task.remote(job_id) for _ in range(helpers)]
        except Exception as e:  # the search still runs, on this worker and any idle local ones
            log.warning("no trials on Ray for this job (unreachable?): they run without it",
                        extra={"fields": {"job": job_id, "ray_address": self.address,
                                          "error": f"{type(e).__name__}: {e}"}})
            return []
        log.info("trials on Ray", extra={"fields": {"job": job_id, "tasks": helpers, "num_cpus": cpus}})
        return tasks

    def end(self, job_id: str, helpers_left: Callable[[], int]) -> None:
        """The job is over: its helpers stop at their next heartbeat (they see the search closed or
        the job no longer running) and release their slots; after `grace` seconds, tasks still
        queued for a CPU or still running are cancelled. A task's failure is logged here."""
        tasks = self._tasks.pop(job_id, [])
        if not tasks:
            return
        import ray

        deadline = time.monotonic() + self.grace
        while helpers_left() and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            done, left = ray.wait(tasks, num_returns=len(tasks), timeout=0)
            for ref in left:
                ray.cancel(ref)
        except Exception as e:  # the cluster went away: its tasks with it; the job's outcome stands
            log.warning("could not cancel the job's Ray tasks",
                        extra={"fields": {"job": job_id, "error": str(e)}})
            return
        for ref in done:
            try:
                log.info("Ray helper ended", extra={"fields": {"job": job_id, "helper": ray.get(ref)}})
            except Exception as e:
                log.warning("Ray helper failed", extra={"fields": {"job": job_id, "error": str(e)[-2000:]}})

    def _connect(self) -> Any:
        import ray

        if ray.is_initialized():
            return ray
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        if host and port.isdigit():
            socket.create_connection((host, int(port)), CONNECT_TIMEOUT).close()
        term = signal.getsignal(signal.SIGTERM)
        ray.init(address=self.address, namespace="strata-training")
        if term is not None and threading.current_thread() is threading.main_thread():
            # ray.init makes SIGTERM exit at once; the worker's own handler finishes the job first.
            signal.signal(signal.SIGTERM, term)
        return ray
