"""One training job, start to end, on the worker that holds its lease:

load the dataset -> hold out rows -> search (Optuna study in the service's database; each trial
an MLflow child run) -> fit the chosen parameters -> export to ONNX and check parity -> score the
candidate and the champion on the same held-out rows (the gate) -> register a passing candidate
with its lineage and the `challenger` alias.

A job may be run more than once (its worker died, another claims it): the study and the MLflow
parent run are found again and carry on. Optuna's trial heartbeats mark the dead worker's trial
failed, RetryFailedTrialCallback queues its parameters again, and the study stops at n_trials
trials COMPLETE or PRUNED, so no trial is counted twice. Registration uses the job's id as its
request id: a retried registration resumes the first one, and the registry shows a version only
once its artifact is committed.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from sqlalchemy.exc import DBAPIError

from services.common.errors import InvalidArgument, StrataError
from services.common.db import sqlite_wal
from services.common.paths import Confinement
from services.training import datasets, ensemble, export, metrics, plots, search
from services.training.jobs import HelperLease, JobStore, Lease, LeaseLost
from services.training.ray_trials import RayTrials
from services.training.tracking import Tracker
from services.training.trainers import FAMILIES
from services.training.types import (
    Gate,
    JobSpec,
    JobState,
    LeaderboardEntry,
    Progress,
    Result,
    Split,
    Task,
)

log = logging.getLogger("strata.training.runner")
optuna.logging.set_verbosity(optuna.logging.WARNING)
# Trial heartbeats and grouped TPE are marked experimental; they are what this runner is built on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
INNER_VALIDATION = 0.2  # share of the training rows each trial is scored on (the held-out rows never are)
AUTOML_FOLDS = 3
#: Trials beside each family's best that AutoML's ensemble selection may mix (its library).
ENSEMBLE_LIBRARY = 10
INFO = "strata"  # the user attribute holding a trial's MLflow run, family and worker
PROGRESS_EVERY = 1.0  # seconds between progress writes during a search


def trial_info(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The MLflow run id, family and worker a trial recorded."""
    return trial.user_attrs.get(INFO, {})


@dataclass(frozen=True)
class Lineage:
    mlflow_run_id: str
    training_job_id: str
    feature_views: tuple[str, ...]
    dataset_hash: str
    dataset_uri: str
    feature_set: str
    features: tuple[str, ...] = ()  # "{view}:{feature}" per model input, for serving by entity key


@dataclass(frozen=True)
class Champion:
    version: int
    onnx: bytes


class ModelRegistry(Protocol):
    """The registry as training needs it (services/training/registry_target.py over gRPC)."""

    def champion(self, model: str, alias: str) -> Champion | None: ...

    def register(self, model: str, onnx_path: Path, *, metrics: dict[str, float], tags: dict[str, str],
                 lineage: Lineage, request_id: str, alias: str) -> int: ...


class Cancelled(Exception):
    pass


class _Watch:
    """The lease's heartbeat in a thread: renews it, and notices a cancel or a lost lease."""

    def __init__(self, store: JobStore, lease: Lease, every: float) -> None:
        self.store, self.lease, self.every = store, lease, every
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{lease.job_id}", daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if self.store.heartbeat(self.lease):
                    self.cancelled.set()
            except LeaseLost:
                self.lost.set()
                return
            except Exception:  # a database hiccup: try again at the next beat
                log.exception("lease heartbeat failed", extra={"fields": {"job": self.lease.job_id}})

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"jobs/{self.lease.job_id}: the lease is lost")
        if self.cancelled.is_set():
            raise Cancelled()


class JobRunner:
    def __init__(self, store: JobStore, tracker: Tracker, registry: ModelRegistry, confinement: Confinement,
                 study_storage_url: str, *, features: datasets.FeatureSource | None = None, threads: int = 1,
                 workdir: Path | None = None, ray_trials: RayTrials | None = None) -> None:
        self.store = store
        self.tracker = tracker
        self.registry = registry
        self.confinement = confinement
        self.study_storage_url = study_storage_url
        self.features = features
        self.threads = threads
        self.workdir = workdir or Path("/tmp")
        self.ray_trials = ray_trials  # parallel trials also as Ray tasks (STRATA_TRAINING_RAY_ADDRESS)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial it runs

    def storage(self) -> RDBStorage:
        lease = self.store.lease_seconds
        # Trial heartbeats: a trial whose worker stopped beating for `grace` seconds is failed and
        # retried (with its parameters) by the next worker; grace < the job lease, so by the time
        # another worker holds the job the dead one's trial is already stale.
        for attempt in range(3):
            try:
                storage = RDBStorage(self.study_storage_url, heartbeat_interval=max(1, int(lease / 6)),
                                     grace_period=max(2, int(lease / 2)),
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                                     engine_kwargs={"pool_pre_ping": True})
                break
            except DBAPIError:
                # The first storage on a database creates Optuna's tables and stamps their version:
                # a driver and a helper starting the same instant collide (UNIQUE alembic_version),
                # and the loser finds the tables made once the winner has finished.
                if attempt == 2:
                    raise
                time.sleep(0.5)
        if self.study_storage_url.startswith("sqlite"):
            sqlite_wal(storage.engine)
        return storage

    # -- the job -----------------------------------------------------------------------------------
    def run(self, lease: Lease) -> JobState:
        spec = lease.job.spec
        progress = Progress(trials_total=spec.hpo.n_trials if spec.hpo else 0, stage="loading")
        with _Watch(self.store, lease, every=max(0.5, self.store.lease_seconds / 6)) as watch:
            try:
                result = self._run(lease, spec, progress, watch)
            except Cancelled:
                progress.stage = "cancelled"
                self._end_run(lease, "KILLED")
                self.store.finish(lease, JobState.CANCELLED, progress)
                return JobState.CANCELLED
            except LeaseLost:
                log.warning("lease lost: another worker runs the job now", extra={"fields": {"job": lease.job_id}})
                return JobState.RUNNING
            except Exception as e:  # the job fails with the reason; the worker goes on
                message = e.message if isinstance(e, StrataError) else f"{type(e).__name__}: {e}"
                if not isinstance(e, StrataError | ValueError):
                    log.exception("training job failed", extra={"fields": {"job": lease.job_id}})
                progress.stage = "failed"
                self._end_run(lease, "FAILED")
                self.store.finish(lease, JobState.FAILED, progress, error=message)
                return JobState.FAILED
            finally:
                if self.ray_trials is not None:
                    self.ray_trials.end(lease.job_id, lambda: self.store.live_helpers(lease.job_id))
        progress.stage = "done"
        self._end_run(lease, "FINISHED")
        self.store.finish(lease, JobState.SUCCEEDED, progress, result)
        return JobState.SUCCEEDED

    def _end_run(self, lease: Lease, status: str) -> None:
        if lease.mlflow_run_id:
            try:
                self.tracker.end(lease.mlflow_run_id, status)
            except Exception:
                log.exception("could not close the MLflow run", extra={"fields": {"run": lease.mlflow_run_id}})

    def _stage(self, lease: Lease, progress: Progress, stage: str, watch: _Watch) -> None:
        watch.check()
        progress.stage = stage
        self.store.report(lease, progress)

    def _run(self, lease: Lease, spec: JobSpec, progress: Progress, watch: _Watch) -> Result:
        self.store.report(lease, progress)
        if spec.hpo is not None and spec.hpo.parallelism > 1:
            # Helpers join now: they load the rows while this worker does, and wait for the study.
            self.store.open_search(lease, spec.hpo.parallelism - 1)
            if self.ray_trials is not None:
                self.ray_trials.submit(lease.job_id, spec.hpo.parallelism - 1)
        data, y, classes, train, held = self._load(spec, lease.job_id, lease.job.created_by)
        tags = self._tags(lease.job_id, lease.job.created_by, spec, data)
        experiment_id = self.tracker.experiment(spec.experiment)
        if not lease.mlflow_run_id:
            self.store.set_run(lease, self.tracker.start(experiment_id, f"job-{lease.job_id}", tags))
            self.tracker.log(lease.mlflow_run_id, params={
                "rows": len(y), "columns": len(data.columns), "holdout_rows": len(held),
                "metric": spec.validation.metric, "split": spec.validation.split.name.lower()})
        run_id = lease.mlflow_run_id
        metric = spec.validation.metric
        family, params, leaderboard = spec.family, dict(spec.params), []
        if spec.hpo is not None or spec.automl is not None:
            family, params, leaderboard = self._search(lease, spec, data, y, train, classes, experiment_id, tags,
                                                       progress, watch)
        # The candidate: the chosen parameters fitted on every training row.
        self._stage(lease, progress, "fitting", watch)
        fam = ensemble.EnsembleFamily() if family == ensemble.NAME else FAMILIES[family]
        X_train, X_held = data.X[train], data.X[held]
        model = fam.fit(fam.build(spec.task, params, spec.validation.seed, self.threads), X_train, y[train],
                        X_held[:1], lambda step, out: watch.check())
        held_out = fam.output(model, X_held, spec.task)
        scores = metrics.all_scores(spec.task, y[held], held_out, getattr(model, "classes_", classes))
        self.tracker.log(run_id, params={"family": family, **{f"param.{k}": v for k, v in params.items()}},
                         metrics={f"holdout_{k}": v for k, v in scores.items()})
        self.tracker.artifact(run_id, *plots.held_out_plot(spec.task, y[held], held_out,
                                                          getattr(model, "classes_", classes)))
        # Export, checked against the native model on the held-out rows.
        self._stage(lease, progress, "exporting", watch)
        onnx_model = export.with_column_inputs(fam.export(model, len(data.columns), spec.task), data.columns,
                                               spec.task, getattr(model, "classes_", None))
        onnx_bytes = onnx_model.SerializeToString()
        parity = export.check_parity(onnx_bytes, fam, model, X_held, data.columns, spec.task,
                                     spec.validation.parity_tolerance)
        self.tracker.artifact(run_id, "model.onnx", onnx_bytes)
        self.tracker.json_artifact(run_id, "parity.json", dataclasses.asdict(parity))
        self._log_native(run_id, fam, model, data.columns)
        self.tracker.log(run_id, metrics={"parity_max_abs_diff": parity.max_abs_diff,
                                          "parity_label_agreement": parity.label_agreement})
        if not parity.passed:
            raise ValueError(f"ONNX parity failed: max |onnx - native| = {parity.max_abs_diff:.3g} over "
                             f"{parity.rows} held-out rows (tolerance {parity.tolerance:g}); labels agree on "
                             f"{parity.label_agreement:.4%} of the rows")
        # The gate: the candidate and the champion on the same held-out rows.
        self._stage(lease, progress, "validating", watch)
        gate = self._gate(spec, scores, y[held], X_held, data.columns)
        self.tracker.json_artifact(run_id, "gate.json", dataclasses.asdict(gate))
        self.tracker.log(run_id, tags={"strata.gate": "passed" if gate.passed else "refused"})
        result = Result(mlflow_run_id=run_id, experiment_id=experiment_id, family=family, params=params,
                        metrics=scores, parity=parity, gate=gate, dataset_hash=data.sha256,
                        feature_views=list(data.feature_views), leaderboard=leaderboard)
        if gate.passed:
            self._stage(lease, progress, "registering", watch)
            path = self.workdir / f"job-{lease.job_id}.onnx"
            path.write_bytes(onnx_bytes)
            try:
                version = self.registry.register(
                    spec.model_name, path, metrics={k: v for k, v in scores.items() if v == v},
                    tags={"strata.job_id": lease.job_id, "strata.family": family, "strata.gate_metric": metric},
                    lineage=Lineage(run_id, lease.job_id, tuple(data.feature_views), data.sha256, data.uri,
                                    data.feature_set, tuple(data.features)),
                    request_id=f"training-job-{lease.job_id}", alias=spec.alias)
            finally:
                path.unlink(missing_ok=True)
            result.model_name, result.model_version = spec.model_name, version
            self.tracker.log(run_id, tags={"strata.registered": f"{spec.model_name}/{version}"})
        return result

    def _load(self, spec: JobSpec, job_id: str, principal: str) -> tuple[datasets.Dataset, np.ndarray,
                                                                        np.ndarray | None, np.ndarray, np.ndarray]:
        """The dataset, labels, classes and the (train, held-out) rows: the same for the driver and
        every helper of a job (the split is seeded)."""
        data = datasets.load(spec.dataset, spec.validation, self.confinement, self.features, principal, job_id)
        y = data.y
        classes = np.unique(y) if spec.task == Task.CLASSIFICATION else None
        if classes is not None and len(classes) < 2:
            raise InvalidArgument("spec.dataset.label_column", "a classifier needs at least two classes in the labels")
        if spec.task == Task.REGRESSION:
            y = y.astype(np.float64)
        train, held = datasets.split(len(y), y, spec.task, spec.validation, data.time)
        if len(held) == 0 or len(train) < 2:
            raise InvalidArgument("spec.dataset", f"{len(y)} rows are too few to hold some out")
        return data, y, classes, train, held

    @staticmethod
    def _tags(job_id: str, principal: str, spec: JobSpec, data: datasets.Dataset) -> dict[str, str]:
        return {"strata.job_id": job_id, "strata.dataset_hash": data.sha256, "strata.dataset_uri": data.uri,
                "strata.feature_set": data.feature_set, "strata.feature_views": ",".join(data.feature_views),
                "strata.principal": principal, "strata.task": spec.task.name.lower(), "strata.origin": spec.origin}

    def _log_native(self, run_id: str, fam: Any, model: Any, columns: list[str]) -> None:
        import joblib

        buf = io.BytesIO()
        joblib.dump(model, buf)
        self.tracker.artifact(run_id, "native_model.joblib", buf.getvalue())
        imp = fam.importances(model)
        if imp is not None and len(imp) == len(columns):
            order = np.argsort(-imp)
            self.tracker.json_artifact(run_id, "feature_importances.json",
                                       {columns[i]: float(imp[i]) for i in order})

    def _gate(self, spec: JobSpec, scores: dict[str, float], y: np.ndarray, X: np.ndarray,
              columns: list[str]) -> Gate:
        v = spec.validation
        metric = v.metric
        candidate = scores[metric]
        for name, floor in v.floors.items():
            if not metrics.better(name, scores[name], floor):
                return Gate(False, metric, candidate, None, 0, f"{name} {scores[name]:.6g} is worse than its floor "
                                                                f"{floor:g}")
        champ = self.registry.champion(spec.model_name, v.champion_alias)
        if champ is None:
            return Gate(True, metric, candidate, None, 0, f"no '{v.champion_alias}' version of {spec.model_name} "
                                                           "to beat; the floors hold")
        sess = export.session(champ.onnx)
        try:
            out = export.onnx_output(sess, X, columns, spec.task)
        except KeyError as e:
            return Gate(False, metric, candidate, None, champ.version,
                        f"the champion (version {champ.version}) cannot be scored on these rows: {e.args[0]}")
        classes = export.model_classes(sess) if spec.task == Task.CLASSIFICATION else None
        if spec.task == Task.CLASSIFICATION and classes is None:
            classes = np.unique(y)
        theirs = metrics.score(metric, spec.task, y, out, classes)
        if metrics.better(metric, candidate, theirs, v.min_improvement):
            return Gate(True, metric, candidate, theirs, champ.version,
                        f"{metric} {candidate:.6g} beats the champion's {theirs:.6g} (version {champ.version}) "
                        f"by at least {v.min_improvement:g}")
        return Gate(False, metric, candidate, theirs, champ.version,
                    f"{metric} {candidate:.6g} does not beat the champion's {theirs:.6g} (version {champ.version}) "
                    f"by {v.min_improvement:g}")

    # -- the search --------------------------------------------------------------------------------
    def _search(self, lease: Lease, spec: JobSpec, data: datasets.Dataset, y: np.ndarray, train: np.ndarray,
                classes: np.ndarray | None, experiment_id: str, tags: dict[str, str], progress: Progress,
                watch: _Watch) -> tuple[str, dict[str, Any], list[LeaderboardEntry]]:
        """The driver's search: it creates the study, opens it to helper workers when the spec asks
        for parallel trials, runs trials itself, and once the study is done waits for the helpers
        before it reads the best trial."""
        s = _Search(self, spec, data, y, train, classes, experiment_id, tags, lease.mlflow_run_id, watch)
        self._close_stale_runs(lease.mlflow_run_id)  # before helpers can start runs in the new study
        study = s.study(create=True)
        self._stage(lease, progress, "searching", watch)
        started = time.monotonic()
        parallel = spec.hpo.parallelism if spec.hpo else 1

        last_write = [0.0]

        def after_trial(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
            if watch.cancelled.is_set() or watch.lost.is_set():
                study.stop()
                return
            if time.monotonic() - last_write[0] < PROGRESS_EVERY:  # a watcher polls twice a second
                return
            last_write[0] = time.monotonic()
            self._progress(study, progress, s.n_trials, started, parallel)
            try:
                self.store.report(lease, progress)
            except LeaseLost:
                study.stop()

        if s.automl is not None and not study.trials:
            # Every family with its default parameters first: the search starts from the baselines a
            # user would try by hand, and the winner is never worse than the best of them.
            for f in s.families:
                study.enqueue_trial({"family": f}, user_attrs={"defaults": True})
        try:
            s.optimize(study, [after_trial])
        finally:
            if parallel > 1:
                self.store.close_search(lease)
                self._wait_for_helpers(lease, study, watch)
            else:
                _fail_orphans(study)
        watch.check()
        self._progress(study, progress, s.n_trials, started, 1)
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if not complete:
            failed = [t for t in study.trials if t.state == TrialState.FAIL]
            why = failed[0].system_attrs.get("fail_reason", "") if failed else ""
            raise ValueError(f"no trial completed ({len(study.trials)} tried){': ' + why if why else ''}")
        best = study.best_trial
        family = trial_info(best).get("family", spec.family)
        params = s.params_of(best, family)
        self.tracker.log(lease.mlflow_run_id, metrics={f"best_val_{s.metric}": best.value},
                         tags={"strata.best_trial": str(best.number), "strata.best_run_id":
                               trial_info(best).get("run_id", "")})
        if not s.automl:
            return family, params, []
        board = self._leaderboard(complete, s.maximize)
        self._stage(lease, progress, "ensembling", watch)
        chosen, value = self._ensemble(s, complete, y[train])
        if len(chosen) > 1:  # the mixture beat the best single model on the out-of-fold rows
            members = [{"family": c.family, "params": c.params, "weight": n} for c, n in chosen]
            self.tracker.log(lease.mlflow_run_id, metrics={f"ensemble_oof_{s.metric}": value},
                             tags={"strata.ensemble": ", ".join(f"{c.family} x{n}" for c, n in chosen)})
            board.insert(0, LeaderboardEntry(ensemble.NAME, value, len(chosen), ""))
            return ensemble.NAME, {"members": members}, board
        return family, params, board

    def _ensemble(self, s: _Search, complete: list, y_train: np.ndarray) -> tuple[list, float]:
        """Greedy ensemble selection over a library of the search's models (each family's best
        trial and the best ENSEMBLE_LIBRARY trials overall), on out-of-fold outputs (kept by the
        trials this worker ran, recomputed for the others), and the selection's score."""
        ranked = sorted(complete, key=lambda t: -t.value if s.maximize else t.value)
        library: dict[int, optuna.trial.FrozenTrial] = {t.number: t for t in ranked[:ENSEMBLE_LIBRARY]}
        seen: set[str] = set()
        for t in ranked:
            fam = trial_info(t).get("family", "")
            if fam and fam not in seen:
                seen.add(fam)
                library.setdefault(t.number, t)
        candidates = []
        for t in library.values():
            fam = trial_info(t).get("family", "")
            params = s.params_of(t, fam)
            oof = s.oof.get(t.number)
            if oof is None:
                oof = ensemble.out_of_fold(fam, params, s.spec.task, s.indexed_folds, len(y_train),
                                           s.spec.validation.seed, self.threads, s.watch.check)
            candidates.append(ensemble.Candidate(fam, params, oof))
        rows = s.oof_rows
        chosen = ensemble.select([ensemble.Candidate(c.family, c.params, c.oof[rows]) for c in candidates],
                                 s.metric, s.spec.task, y_train[rows], s.classes)
        mix = sum(n * c.oof for c, n in chosen) / sum(n for _c, n in chosen)
        return chosen, metrics.score(s.metric, s.spec.task, y_train[rows], mix, s.classes)

    def _wait_for_helpers(self, lease: Lease, study: optuna.Study, watch: _Watch) -> None:
        """Helpers finish the trial they are in once the search closes; a dead one's lease runs
        out (its trial is then failed by its missing heartbeat). A trial still RUNNING after that
        is a dead worker's (a helper's, or the previous attempt's driver killed mid-trial): it is
        failed once its heartbeat is older than the grace period, so wait that long at most and no
        trial is left RUNNING."""
        deadline = time.monotonic() + 2 * self.store.lease_seconds
        while self.store.live_helpers(lease.job_id) and time.monotonic() < deadline:
            if watch.lost.is_set():
                return
            time.sleep(0.2)
        storage = study._storage  # (the RDB storage this runner built, with its heartbeat settings)
        grace = getattr(storage, "grace_period", None) or 0
        deadline = time.monotonic() + grace + 2 * (getattr(storage, "heartbeat_interval", None) or 0)
        while True:
            optuna.storages.fail_stale_trials(study)
            running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if not running or time.monotonic() >= deadline or watch.lost.is_set():
                return
            time.sleep(0.5)

    def run_helper(self, helper: HelperLease) -> None:
        """A helper worker's part of a job's search: trials of the same study, until the study has
        its trials or the driver closes the search. It never fits the final model or registers."""
        job = helper.job
        spec = job.spec
        with _Watch(self.store, helper, every=max(0.5, self.store.lease_seconds / 6)) as watch:
            try:
                data, y, classes, train, _held = self._load(spec, job.job_id, job.created_by)
                s = _Search(self, spec, data, y, train, classes, self.tracker.experiment(spec.experiment),
                            self._tags(job.job_id, job.created_by, spec, data), helper.mlflow_run_id, watch)

                def still_open(study: optuna.Study, _t: optuna.trial.FrozenTrial) -> None:
                    if watch.cancelled.is_set() or watch.lost.is_set():
                        study.stop()
                study = s.wait_for_study(watch)
                # The driver starts the job's MLflow run before it creates the study; a helper that
                # joined earlier has no parent run in its lease.
                s.parent_run = s.parent_run or self.store.mlflow_run(job.job_id)
                s.optimize(study, [still_open])
            except (Cancelled, LeaseLost):
                pass
            except Exception:
                log.exception("helper search failed", extra={"fields": {"job": job.job_id}})
            finally:
                self.store.release_helper(helper)

    @staticmethod
    def _counted(study: optuna.Study) -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    @staticmethod
    def _progress(study: optuna.Study, progress: Progress, n_trials: int, started: float, parallel: int) -> None:
        trials = study.get_trials(deepcopy=False)
        counts = {s: 0 for s in TrialState}
        for t in trials:
            counts[t.state] += 1
        progress.trials_done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        progress.trials_pruned = counts[TrialState.PRUNED]
        progress.trials_failed = counts[TrialState.FAIL]
        if counts[TrialState.COMPLETE]:
            progress.best_value = float(study.best_value)
        elapsed = time.monotonic() - started
        left = max(0, n_trials - progress.trials_done)
        progress.eta_seconds = (elapsed / max(1, progress.trials_done)) * left / max(1, parallel) if n_trials else 0.0

    @staticmethod
    def _leaderboard(complete: list, maximize: bool) -> list[LeaderboardEntry]:
        by_family: dict[str, list] = {}
        for t in complete:
            by_family.setdefault(trial_info(t).get("family", ""), []).append(t)
        board = []
        for family, trials in by_family.items():
            best = (max if maximize else min)(trials, key=lambda t: t.value)
            board.append(LeaderboardEntry(family, float(best.value), len(trials), trial_info(best).get("run_id", "")))
        return sorted(board, key=lambda e: -e.best_value if maximize else e.best_value)

    def _close_stale_runs(self, parent: str) -> None:
        """Child runs a dead worker left RUNNING are KILLED (its trials are retried as new runs)."""
        try:
            runs = self.tracker.client.search_runs(
                [self.tracker.client.get_run(parent).info.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'RUNNING'")
            for r in runs:
                self.tracker.end(r.info.run_id, "KILLED")
        except Exception:
            log.exception("could not close stale trial runs", extra={"fields": {"run": parent}})


class _Search:
    """What the driver and the helpers of one job share: the rows a trial fits and is scored on,
    the study, and the objective (one MLflow child run per trial)."""

    def __init__(self, runner: JobRunner, spec: JobSpec, data: datasets.Dataset, y: np.ndarray, train: np.ndarray,
                 classes: np.ndarray | None, experiment_id: str, tags: dict[str, str], parent_run: str,
                 watch: _Watch) -> None:
        self.runner, self.spec, self.classes = runner, spec, classes
        self.experiment_id, self.tags, self.parent_run, self.watch = experiment_id, tags, parent_run, watch
        self.hpo, self.automl = spec.hpo, spec.automl
        self.metric = spec.validation.metric
        self.maximize = metrics.MAXIMIZE[self.metric]
        # (fit rows, validation rows) of each fold: AutoML scores a trial by 3-fold cross-validation
        # over the training rows (choosing among families on one 20 % split picked by noise);
        # an HPO trial on one inner split; a time split keeps one split (no look-ahead).
        folds = datasets.folds(y[train], spec.task, spec.validation, AUTOML_FOLDS) \
            if self.automl is not None and spec.validation.split != Split.TIME else \
            [datasets.split(len(train), y[train], spec.task, spec.validation,
                            data.time[train] if data.time is not None else None, INNER_VALIDATION)]
        self.folds = [(data.X[train[f]], y[train[f]], data.X[train[v]], y[train[v]]) for f, v in folds]
        # AutoML keeps each trial's out-of-fold outputs (trial number -> rows of `train`) for the
        # ensemble selection that follows its search: the folds cover every training row once.
        self.indexed_folds = [(*fold, v) for fold, (_f, v) in zip(self.folds, folds, strict=True)]
        self.oof: dict[int, np.ndarray] = {}
        self.n_train = len(train)
        self.oof_rows = np.sort(np.concatenate([v for _f, v in folds]))  # every row, but with a time split
        self.families = list(self.automl.families or FAMILIES) if self.automl else [spec.family]
        self.space = self.hpo.search_space if self.hpo else ()
        self.n_trials = self.hpo.n_trials if self.hpo and self.hpo.n_trials else 0
        self.prunes = (self.hpo.pruner if self.hpo else "median") != "none"
        self.timeout = ((self.automl.time_budget_seconds if self.automl else 0)
                        or (self.hpo.timeout_seconds if self.hpo else 0) or None)

    def params_of(self, trial: optuna.trial.FrozenTrial, family: str) -> dict[str, Any]:
        """The family parameters a trial fitted with (its own suggestions over the spec's)."""
        prefix = f"{family}." if self.automl else ""
        return {**self.spec.params, **{k.removeprefix(prefix): v for k, v in trial.params.items()
                                       if k != "family" and k.startswith(prefix)}}

    def study(self, *, create: bool) -> optuna.Study:
        hpo = self.hpo or search.HpoSpec()
        name = f"job-{self.tags['strata.job_id']}"
        sampler = search.sampler(hpo, self.spec.validation.seed)
        pruner = search.pruner(hpo, automl=self.automl is not None)
        if create:
            return optuna.create_study(study_name=name, storage=self.runner.storage(), load_if_exists=True,
                                       direction="maximize" if self.maximize else "minimize", sampler=sampler,
                                       pruner=pruner)
        return optuna.load_study(study_name=name, storage=self.runner.storage(), sampler=sampler, pruner=pruner)

    def wait_for_study(self, watch: _Watch) -> optuna.Study:
        """A helper's study: the driver creates it once it has its rows, as the helper does."""
        while True:
            try:
                return self.study(create=False)
            except KeyError:  # optuna: no study of that name yet
                watch.check()
                time.sleep(0.2)

    def optimize(self, study: optuna.Study, callbacks: list[Callable]) -> None:
        if self.n_trials:
            if JobRunner._counted(study) >= self.n_trials:
                return
            callbacks = [MaxTrialsCallback(self.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
                         *callbacks]
        study.optimize(self.objective, timeout=self.timeout, callbacks=callbacks,
                       catch=(ValueError, ArithmeticError, RuntimeError))

    def objective(self, trial: optuna.Trial) -> float:
        spec, tracker, metric, watch = self.spec, self.runner.tracker, self.metric, self.watch
        watch.check()
        family = trial.suggest_categorical("family", self.families) if self.automl else spec.family
        fam = FAMILIES[family]
        fam_space = self.space if not self.automl else (self.space or fam.space(spec.task))
        if trial.user_attrs.get("defaults"):  # AutoML's baseline: the family as it comes
            params = dict(spec.params)
        else:
            params = {**spec.params, **search.suggest(trial, fam_space, prefix=f"{family}." if self.automl else "")}
        run_id = tracker.start(self.experiment_id, f"trial-{trial.number}", {
            **self.tags, "strata.trial": str(trial.number), "strata.family": family}, parent=self.parent_run)
        # One write: the trial's MLflow run, family and worker (trial_info reads them back).
        trial.set_user_attr(INFO, {"run_id": run_id, "family": family, "worker": self.runner.worker})
        steps: list[tuple[str, float, int]] = []

        def report(step: int, out: np.ndarray) -> None:  # on the first fold: every trial's same rows
            watch.check()
            value = metrics.score(metric, spec.task, self.folds[0][3], out, self.classes)
            steps.append((f"val_{metric}", value, step))
            if self.prunes:  # Optuna keeps intermediate values for its pruner; MLflow keeps the steps anyway
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}")

        def check(_step: int, _out: np.ndarray) -> None:
            watch.check()

        try:
            scores, oof = [], None
            for k, (X_fit, y_fit, X_val, y_val, index) in enumerate(self.indexed_folds):
                model = fam.fit(fam.build(spec.task, params, spec.validation.seed, self.runner.threads), X_fit,
                                y_fit, X_val, report if k == 0 else check)
                out = fam.output(model, X_val, spec.task)
                scores.append(metrics.score(metric, spec.task, y_val, out, self.classes))
                if self.automl is not None:
                    out = np.asarray(out, dtype=np.float64).reshape(len(X_val), -1)
                    oof = np.zeros((self.n_train, out.shape[1])) if oof is None else oof
                    oof[index] = out
            value = float(np.mean(scores))
            if oof is not None:
                self.oof[trial.number] = oof if spec.task == Task.CLASSIFICATION else oof.ravel()
        except optuna.TrialPruned:
            tracker.log(run_id, params={"family": family, **params}, steps=steps, tags={"strata.state": "pruned"})
            tracker.end(run_id, "KILLED")
            raise
        except (Cancelled, LeaseLost):
            tracker.end(run_id, "KILLED")
            raise
        except Exception as e:
            tracker.log(run_id, params={"family": family, **params}, tags={"strata.error": str(e)[:500]})
            tracker.end(run_id, "FAILED")
            raise
        tracker.log(run_id, params={"family": family, **params}, metrics={f"val_{metric}": value}, steps=steps)
        tracker.end(run_id)
        return value


def _fail_orphans(study: optuna.Study) -> None:
    """Fail the trials left RUNNING when a search without helpers ends: this worker ran the only
    trials of the job, so such a trial is the previous attempt's, whose worker died inside it
    (its heartbeat may not be stale yet; left RUNNING, it would stay so for good)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_system_attr(t._trial_id, "fail_reason", "its worker died (an earlier attempt)")
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
