"""A training worker: claims jobs from the database under a lease and runs them, one at a time;
with nothing queued, it joins the open search of a job that asked for parallel trials (runs trials
of the same Optuna study until it is done).

`python -m services.training.worker` (the training service starts STRATA_TRAINING_WORKERS of them
and restarts any that dies; more run on other machines against the same database). A worker
killed mid-job leaves its lease to run out; another worker then resumes the job (runner.py).
Threads: each worker's OpenMP and the families' n_jobs get cores / workers threads, BLAS one, set
before numpy loads, so workers side by side do not oversubscribe the CPU."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

log = logging.getLogger("strata.training.worker")


class Worker:
    def __init__(self, runner, poll_seconds: float = 1.0, owner: str = "") -> None:
        self.runner = runner
        self.poll_seconds = poll_seconds
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.stop = threading.Event()

    def run_once(self) -> bool:
        """Claim and run one job; False when there was none."""
        lease = self.runner.store.claim(self.owner)
        if lease is None:
            helper = self.runner.store.claim_helper(self.owner)
            if helper is None:
                return False
            log.info("joining a job's search", extra={"fields": {"job": helper.job_id, "slot": helper.slot}})
            self.runner.run_helper(helper)
            return True
        log.info("running job", extra={"fields": {"job": lease.job_id, "attempt": lease.job.attempts}})
        state = self.runner.run(lease)
        log.info("job ended", extra={"fields": {"job": lease.job_id, "state": state.name}})
        return True

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                if self.run_once():
                    continue
            except Exception:
                log.exception("worker loop error")
            self.stop.wait(self.poll_seconds)


def main() -> None:
    from services.common.process_tuning import threads_per_process

    threads = os.environ.get("STRATA_TRAINING_THREADS_PER_WORKER") or str(threads_per_process(
        int(os.environ.get("STRATA_TRAINING_WORKERS", "1") or 1)))
    os.environ.setdefault("OMP_NUM_THREADS", threads)
    # BLAS stays single-threaded: the trainers' matrices are small, and a second OpenBLAS thread made
    # a logistic regression fit 14x slower on 2 cores (10 ms -> 141 ms, 16,000 x 40 rows); their
    # parallel work is OpenMP's (boosting, forests) and torch's, sized above.
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from services.common import telemetry
    from services.common.settings import ServiceSettings
    from services.training.app import TrainingConfig, build_runner

    settings = ServiceSettings.for_service("training")
    telemetry.setup_logging(settings.log_level, settings.log_format)
    config = TrainingConfig()
    from services.training.trainers import preload

    preload()
    worker = Worker(build_runner(settings, config, threads=int(threads)), poll_seconds=config.poll_seconds)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop.set())
    worker.serve()


if __name__ == "__main__":
    main()
