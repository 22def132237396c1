"""Parallel trials: one job's study shared by two worker processes on PostgreSQL, against one
worker, with the platform's thread sizing and nothing set by the user (each worker gets cores /
workers numeric threads, as `python -m services.training` gives its workers).

    .venv/bin/python -m tests.bench.training_parallel [--trials 16] [--rounds 2] [--family linear]

Per round and setup: a fresh PostgreSQL database on 127.0.0.1:5432 for the job store and the
Optuna study, MLflow on a SQLite file, the worker processes (`python -m services.training.worker`),
one job with `n_trials` trials (`parallelism` 1 or 2) on a generated table (`--rows` x 40,
make_classification; 20,000 by default). Trials/s is the number of counted trials over the span from the first
trial's start to the last trial's end, as the study recorded it. The registry at the end is not
reachable (the job then fails at registration, after the measured search; the figure is the
search's).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from services.training.runner import trial_info
from tests.processes import ROOT

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _database() -> tuple[str, str]:
    name = f"strata_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql://postgres@127.0.0.1:5432/{name}"


def _drop(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def one(workers: int, trials: int, family: str, home: Path, rows: int = 20_000) -> tuple[float, int, int]:
    from sklearn.datasets import make_classification

    from services.common.db import Database
    from services.training import spec as specs
    from services.training.app import MIGRATIONS
    from services.training.jobs import JobStore
    from services.training.types import DatasetSpec, HpoSpec, JobSpec, ParamSpec, Task

    X, y = make_classification(n_samples=rows, n_features=40, n_informative=12, random_state=0)
    (home / "artifacts" / "data").mkdir(parents=True)
    pq.write_table(pa.table({**{f"x{i}": X[:, i] for i in range(X.shape[1])}, "y": y}),
                   home / "artifacts" / "data" / "t.parquet")
    name, url = _database()
    try:
        db = Database(url)
        db.migrate(MIGRATIONS)
        space = {"linear": (ParamSpec("C", "float", low=1e-3, high=1e2, log=True),),
                 "hist_gradient_boosting": (ParamSpec("learning_rate", "float", low=0.02, high=0.3, log=True),),
                 "random_forest": (ParamSpec("max_depth", "int", low=4, high=12),)}[family]
        spec = specs.check(JobSpec(dataset=DatasetSpec(label_column="y", table_uri="data/t.parquet"),
                                   task=Task.CLASSIFICATION, model_name="bench", family=family,
                                   hpo=HpoSpec(space, n_trials=trials, pruner="none", parallelism=workers)))
        job = JobStore(db).submit(spec, "bench")
        env = {**os.environ, "STRATA_HOME": str(home), "STRATA_AUTH": "disabled", "STRATA_TRAINING_DATABASE_URL": url,
               "STRATA_TRAINING_WORKERS": str(workers), "STRATA_TRAINING_POLL_SECONDS": "0.2",
               "STRATA_REGISTRY_ADDR": "127.0.0.1:1"}
        env.pop("STRATA_TRAINING_THREADS_PER_WORKER", None)
        log = open(home / "workers.log", "ab")  # noqa: SIM115 - closed below
        procs = [subprocess.Popen([sys.executable, "-m", "services.training.worker"], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT) for _ in range(workers)]
        try:
            store = JobStore(db)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                if all(p.poll() is not None for p in procs):
                    raise RuntimeError(f"the workers exited:\n{(home / 'workers.log').read_text()[-3000:]}")
                j = store.get(job.job_id)
                if j.state.finished or j.progress.stage in ("fitting", "exporting", "validating", "registering"):
                    break
                time.sleep(0.2)
            study = optuna.load_study(study_name=f"job-{job.job_id}", storage=url)
            counted = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            span = (max(t.datetime_complete for t in counted) - min(t.datetime_start for t in counted)).total_seconds()
            return len(counted) / span, len(counted), len({trial_info(t)["worker"] for t in counted})
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
            log.close()
            db.dispose()
    finally:
        _drop(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--family", default="linear", choices=["linear", "hist_gradient_boosting", "random_forest"])
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores; family {args.family}; {args.rows} x 40 rows; {args.trials} trials per job; OpenMP threads per "
          "worker = cores / workers, BLAS 1 (the platform's sizing)")
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                home = Path(tmp) / f"{r}-{workers}"
                rate, n, used = one(workers, args.trials, args.family, home, args.rows)
                rates[workers].append(rate)
                print(f"round {r + 1}: {workers} worker(s): {rate:.2f} trials/s ({n} trials, run by {used} "
                      f"worker(s))", flush=True)
    ratios = [b / a for a, b in zip(rates[1], rates[2], strict=True)]
    print("two workers / one, per round: " + ", ".join(f"{x:.2f}x" for x in ratios) +
          f"; median {float(np.median(ratios)):.2f}x")


if __name__ == "__main__":
    main()
