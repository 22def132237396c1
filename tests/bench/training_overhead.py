"""Per-trial platform overhead of HPO: Strata's runner against bare Optuna in memory and against
what a user writes by hand (Optuna RDB storage + optuna-integration's MLflowCallback on the same
SQLite backends), side by side in one run, rounds alternating.

    .venv/bin/python -m tests.bench.training_overhead [--trials 100] [--rounds 3]

Every setup runs the same objective: a logistic regression fitted on 80 rows x 4 columns and
scored on 40 (about a millisecond: a near no-op, so what is measured is the bookkeeping). A
setup's per-trial time is the span from its first trial's start to its last trial's end over the
number of trials, as the study's storage recorded it (Strata: its job runner in this process,
with the job store, the Optuna study and MLflow on SQLite files, trial heartbeats on, one MLflow
child run per trial, progress written to the job); its overhead is that minus the objective's own
time measured alone. The registry at the end of Strata's job is not in the measured span (an
in-process stand-in answers it; the measured search never calls it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

optuna.logging.set_verbosity(optuna.logging.ERROR)
RNG = np.random.default_rng(0)
X = RNG.normal(size=(120, 4))
Y = (X[:, 0] + 0.5 * X[:, 1] + RNG.normal(scale=0.5, size=120) > 0).astype(int)
X_FIT, Y_FIT, X_VAL, Y_VAL = X[:80], Y[:80], X[80:], Y[80:]


def work(c: float) -> float:
    m = LogisticRegression(C=c, max_iter=200).fit(X_FIT, Y_FIT)
    return float(roc_auc_score(Y_VAL, m.predict_proba(X_VAL)[:, 1]))


def objective(trial: optuna.Trial) -> float:
    return work(trial.suggest_float("C", 1e-3, 1e2, log=True))


def span(study: optuna.Study) -> float:
    trials = [t for t in study.trials if t.datetime_start and t.datetime_complete]
    return (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds() / len(trials)


def bare(n: int, _d: Path) -> float:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=n)
    return span(study)


def hand_written(n: int, d: Path) -> float:
    from optuna_integration.mlflow import MLflowCallback

    callback = MLflowCallback(tracking_uri=f"sqlite:///{d / 'hand-mlflow.db'}", metric_name="roc_auc",
                              mlflow_kwargs={"nested": False})
    study = optuna.create_study(study_name=f"hand-{time.time_ns()}", storage=f"sqlite:///{d / 'hand-optuna.db'}",
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=n, callbacks=[callback])
    return span(study)


class _NoRegistry:
    """Stands in for the registry after the measured search (the gate finds no champion)."""

    def champion(self, model: str, alias: str) -> None:
        return None

    def register(self, *args, **kwargs) -> int:
        return 1


def strata(n: int, d: Path) -> float:
    from services.common.db import Database
    from services.common.paths import Confinement
    from services.training.app import MIGRATIONS
    from services.training.jobs import JobStore
    from services.training.runner import JobRunner
    from services.training.tracking import Tracker
    from services.training.types import DatasetSpec, HpoSpec, JobSpec, ParamSpec, Task, ValidationSpec

    store_dir = d / "artifacts"
    (store_dir / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({**{f"x{i}": X[:, i] for i in range(4)}, "y": Y}), store_dir / "data" / "t.parquet")
    db_url = f"sqlite:///{d / 'strata-training.db'}"
    db = Database(db_url)
    db.migrate(MIGRATIONS)
    jobs = JobStore(db, lease_seconds=30)
    runner = JobRunner(jobs, Tracker(f"sqlite:///{d / 'strata-mlflow.db'}", str(store_dir / "mlflow")), _NoRegistry(),
                       Confinement(str(store_dir)), db_url, workdir=d)
    spec = JobSpec(dataset=DatasetSpec(label_column="y", table_uri="data/t.parquet"), task=Task.CLASSIFICATION,
                   model_name=f"bench{time.time_ns()}", family="linear",
                   hpo=HpoSpec((ParamSpec("C", "float", low=1e-3, high=1e2, log=True),), n_trials=n, pruner="none"),
                   validation=ValidationSpec(metric="roc_auc", holdout_fraction=1 / 3))
    from services.training import spec as specs

    job = jobs.submit(specs.check(spec), "bench")
    lease = jobs.claim("bench")
    runner.run(lease)
    assert jobs.get(job.job_id).state.name == "SUCCEEDED", jobs.get(job.job_id).error
    study = optuna.load_study(study_name=f"job-{job.job_id}", storage=db_url)
    assert len(study.trials) == n
    return span(study)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    for _ in range(200):
        work(1.0)
    own = (time.perf_counter() - t0) / 200
    print(f"objective alone: {own * 1e3:.2f} ms per trial; {args.trials} trials per setup, {args.rounds} rounds")
    setups = [("bare optuna (memory)", bare), ("hand-written (RDB + MLflowCallback)", hand_written),
              ("strata runner", strata)]
    results: dict[str, list[float]] = {name: [] for name, _ in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = setups if r % 2 == 0 else setups[::-1]
            for name, fn in order:
                d = Path(tmp) / f"{name.split()[0]}-{r}"
                d.mkdir()
                per_trial = fn(args.trials, d)
                results[name].append(per_trial)
                print(f"round {r + 1}: {name:<38} {per_trial * 1e3:7.2f} ms/trial, overhead "
                      f"{(per_trial - own) * 1e3:7.2f} ms", flush=True)
    print("\nmedian overhead per trial (ms):")
    med = {name: statistics.median(v) - own for name, v in results.items()}
    for name, v in med.items():
        print(f"  {name:<38} {v * 1e3:7.2f}")
    hand, ours = med["hand-written (RDB + MLflowCallback)"], med["strata runner"]
    print(f"strata / hand-written overhead: {ours / hand:.2f}x")


if __name__ == "__main__":
    main()
