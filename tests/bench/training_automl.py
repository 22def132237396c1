"""AutoML against the best default-parameter model: Strata's runner searches the families within a
time budget (each family's defaults tried first, then TPE over the family and its space); every
family is also fitted with its default parameters on the same training rows. All are scored on
the same held-out rows. Two comparisons are printed: against the default that scores best on the
held-out rows (a maximum over six noisy estimates on the very rows being compared, which favours
the baseline), and against the default that the search's own 3-fold CV ranks first (what a user
choosing a default by validation would have deployed).

    .venv/bin/python -m tests.bench.training_automl [--budget 60] [--rows 12000]

Tables: a generated one of `--rows` rows (scikit-learn's make_classification: 20 columns, 8
informative, 10 % label noise; no download), and the bundled breast-cancer (569 rows) and
diabetes (442 rows) datasets at a quarter of the budget. The runner runs in this process with its
job store, Optuna study and MLflow on SQLite files; the registry after the gate is an in-process
stand-in (registration is not what is measured).
"""

from __future__ import annotations

import argparse
import os

# The job runs in this process as in a training worker: OpenMP sized to the runner's threads, BLAS
# single-threaded (services/training/worker.py), set before numpy loads; trainer libraries loaded
# before the clock starts, as a worker does at start.
os.environ.setdefault("OMP_NUM_THREADS", "2")
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tests.bench.training_overhead import _NoRegistry  # noqa: E402


def _tables(rows: int) -> list[tuple[str, np.ndarray, np.ndarray, str, float]]:
    from sklearn.datasets import load_breast_cancer, load_diabetes, make_classification

    X, y = make_classification(n_samples=rows, n_features=20, n_informative=8, flip_y=0.1, random_state=0)
    bc, db = load_breast_cancer(), load_diabetes()
    return [(f"generated {rows} x 20", X, y, "classification", 1.0),
            ("breast_cancer 569 x 30", bc.data, bc.target, "classification", 0.25),
            ("diabetes 442 x 10", db.data, db.target, "regression", 0.25)]


def run(name: str, X: np.ndarray, y: np.ndarray, kind: str, budget: float, d: Path) -> None:
    from services.common.db import Database
    from services.common.paths import Confinement
    from services.training import datasets, metrics
    from services.training import spec as specs
    from services.training.app import MIGRATIONS
    from services.training.jobs import JobStore
    from services.training.runner import JobRunner
    from services.training.tracking import Tracker
    from services.training.trainers import FAMILIES
    from services.training.types import AutoMLSpec, DatasetSpec, JobSpec, Task, ValidationSpec

    task = Task.CLASSIFICATION if kind == "classification" else Task.REGRESSION
    store = d / "artifacts"
    (store / "data").mkdir(parents=True)
    pq.write_table(pa.table({**{f"x{i}": X[:, i] for i in range(X.shape[1])}, "y": y}), store / "data" / "t.parquet")
    db_url = f"sqlite:///{d / 'training.db'}"
    db = Database(db_url)
    db.migrate(MIGRATIONS)
    jobs = JobStore(db, lease_seconds=30)
    runner = JobRunner(jobs, Tracker(f"sqlite:///{d / 'mlflow.db'}", str(store / "mlflow")), _NoRegistry(),
                       Confinement(str(store)), db_url, workdir=d, threads=2)
    spec = specs.check(JobSpec(dataset=DatasetSpec(label_column="y", table_uri="data/t.parquet"), task=task,
                               model_name="automl", automl=AutoMLSpec(tuple(sorted(FAMILIES)), budget),
                               validation=ValidationSpec(seed=0)))
    job = jobs.submit(spec, "bench")
    started = time.perf_counter()
    runner.run(jobs.claim("bench"))
    took = time.perf_counter() - started
    done = jobs.get(job.job_id)
    assert done.state.name == "SUCCEEDED", done.error
    metric = spec.validation.metric
    winner = done.result.metrics[metric]
    # The defaults of every family, on the same split the job used.
    train, held = datasets.split(len(y), y.astype(np.float64) if task == Task.REGRESSION else y, task,
                                 spec.validation, None)
    Xf = X.astype(np.float32)
    defaults = {}
    for fam_name, fam in FAMILIES.items():
        model = fam.fit(fam.build(task, {}, 0, 2), Xf[train], y[train], Xf[held][:1], lambda s, o: None)
        defaults[fam_name] = metrics.score(metric, task, y[held], fam.output(model, Xf[held], task),
                                           getattr(model, "classes_", None))
    sign = 1 if metrics.MAXIMIZE[metric] else -1
    best_name = max(defaults, key=lambda k: sign * defaults[k])
    # The defaults as the search itself saw them: each family's defaults trial, scored by the same CV.
    import optuna

    from services.training.runner import trial_info

    study = optuna.load_study(study_name=f"job-{job.job_id}", storage=db_url)
    cv = {trial_info(t)["family"]: t.value for t in study.trials
          if t.user_attrs.get("defaults") and t.value is not None}
    by_cv = max(cv, key=lambda k: sign * cv[k])
    board = ", ".join(f"{e.family} {e.best_value:.4f} ({e.trials})" for e in done.result.leaderboard)
    ok = metrics.better(metric, winner, defaults[best_name])
    ok_cv = metrics.better(metric, winner, defaults[by_cv])
    print(f"{name}: budget {budget:.0f} s, job {took:.0f} s, {done.progress.trials_done} trials; leaderboard "
          f"(inner validation) {board}")
    print(f"  held-out {metric}: AutoML winner {done.result.family} {winner:.4f} vs best default "
          f"{best_name} {defaults[best_name]:.4f} -> {'at least as good' if ok else 'WORSE'}; all defaults: "
          + ", ".join(f"{k} {v:.4f}" for k, v in defaults.items()), flush=True)
    print(f"  against the default the same CV ranks first ({by_cv}, CV {cv[by_cv]:.4f}, held-out "
          f"{defaults[by_cv]:.4f}): {'at least as good' if ok_cv else 'WORSE'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=60)
    ap.add_argument("--rows", type=int, default=12_000)
    args = ap.parse_args()
    from services.training.trainers import preload

    preload()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, X, y, kind, share) in enumerate(_tables(args.rows)):
            d = Path(tmp) / str(i)
            d.mkdir()
            run(name, X, y, kind, args.budget * share, d)


if __name__ == "__main__":
    main()
