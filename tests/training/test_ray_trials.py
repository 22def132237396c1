"""Parallel trials on a real Ray cluster: a Ray head started by the test on this machine (`ray start
--head --block`, its processes stopped with it), and a training worker's runner built by
`build_runner` with its Ray address (STRATA_TRAINING_RAY_ADDRESS) set, driving jobs in this
process with no other local worker: the job's other trials run in Ray workers, which build their
own runner from the settings the driver passes, on the same study and under the same MLflow
parent run. (In this process rather than behind the gRPC service, whose start would double the
test's time; the registry after the gate is a stand-in.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from services.common.settings import ServiceSettings
from services.training.app import TrainingConfig, build_runner
from services.training.ray_trials import CONNECT_TIMEOUT, RayTrials
from services.training.runner import JobRunner, trial_info
from services.training.spec import check
from services.training.types import DatasetSpec, HpoSpec, JobSpec, JobState, ParamSpec, Task
from tests.processes import free_port
from tests.training.conftest import breast_cancer

pytestmark = pytest.mark.e2e


class RayHead:
    """`ray start --head --block` on this machine, with its own temp dir and GCS port; stop() ends
    it, and it stops the processes it started (never `ray stop`, which stops every Ray on the host)."""

    def __init__(self) -> None:
        # Ray's socket paths live under its temp dir and must stay short (108 bytes): not tmp_path.
        self.tmp = Path(tempfile.mkdtemp(prefix="strata-ray-"))
        self.port = free_port()
        self.log = self.tmp / "head.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                 f"--port={self.port}", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={self.tmp}",
                 "--disable-usage-stats"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # Ray runs its workers at nice 15: on this machine, shared with other work, a trial
                # there took 4 s against the driver's 0.9 s, and the driver ran nearly every trial.
                env={**os.environ, "RAY_worker_niceness": "0"})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


class _NoRegistry:
    def champion(self, model: str, alias: str) -> None:
        return None

    def register(self, *args: object, **kwargs: object) -> int:
        return 1


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobRunner]:
    import ray

    head = RayHead()
    try:
        with pytest.MonkeyPatch.context() as env:  # the service's settings, as a worker reads them
            env.setenv("STRATA_HOME", str(tmp_path_factory.mktemp("ray-trials")))
            env.setenv("STRATA_AUTH", "disabled")
            settings = ServiceSettings.for_service("training")
            config = TrainingConfig(ray_address=head.address, lease_seconds=4)
            r = build_runner(settings, config, threads=1)
            r.registry = _NoRegistry()
            breast_cancer(Path(settings.artifact_store_url) / "data" / "bc.parquet")
            head.wait_ready()
            # A Ray worker process that has loaded the training stack (about 10 s of imports on this
            # machine), as a cluster that has run a job keeps one: the jobs below then show trials on
            # Ray however fast the driver's own trials are.
            assert ray.get(r.ray_trials.submit("warm-up", 1))[0].endswith("no free slot")
            try:
                yield r
            finally:
                ray.shutdown()
                r.store.db.dispose()
    finally:
        head.stop()


def _spec(n: int) -> JobSpec:
    return check(JobSpec(
        dataset=DatasetSpec(label_column="target", table_uri="data/bc.parquet"), task=Task.CLASSIFICATION,
        model_name="bc-ray", family="random_forest",
        hpo=HpoSpec((ParamSpec("n_estimators", "int", low=100, high=200),
                     ParamSpec("max_depth", "int", low=2, high=8)), n_trials=n, pruner="median", parallelism=2)))


def _study(runner: JobRunner, job_id: str) -> optuna.Study:
    return optuna.load_study(study_name=f"job-{job_id}", storage=runner.study_storage_url)


def test_an_unreachable_cluster_is_a_warning_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    import ray

    assert not ray.is_initialized(), "runs before this module's runner connects to its cluster"
    trials = RayTrials(f"127.0.0.1:{free_port()}", {}, threads=1, grace_seconds=1.0)
    started = time.monotonic()
    assert trials.submit("job", 1) == [] and time.monotonic() - started < CONNECT_TIMEOUT
    assert "no trials on Ray for this job" in caplog.text and not ray.is_initialized()


def test_trials_run_in_ray_workers_on_the_jobs_study_and_mlflow_run(runner: JobRunner) -> None:
    n = 8
    job = runner.store.submit(_spec(n), "alice")
    assert runner.run(runner.store.claim("driver")) == JobState.SUCCEEDED, runner.store.get(job.job_id).error
    done = runner.store.get(job.job_id)
    trials = _study(runner, job.job_id).trials
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    workers = [trial_info(t)["worker"] for t in counted]
    print(f"\n{len(counted)} trials counted ({sum(t.state == TrialState.PRUNED for t in counted)} pruned), "
          f"{len(trials)} in all; by worker: { {w: workers.count(w) for w in set(workers)} }")
    # A helper's trial in flight when the study reaches n_trials is stopped at its next report (FAIL, not
    # counted), once the helper's heartbeat has seen the search close; one that ends before may add one
    # (as with local helpers).
    assert n <= len(counted) <= n + 1 and done.progress.trials_done == len(counted)
    on_ray = {w for w in workers if w.startswith("ray:")}
    assert on_ray and runner.worker in workers, "trials ran both in a Ray worker and on the driver"
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert runner.store.live_helpers(job.job_id) == 0
    # One MLflow child run per trial, whichever process ran it, under the job's run (a trial stopped
    # by the search's close before it began has none, and is not counted).
    tracked = [t for t in trials if "run_id" in trial_info(t)]
    assert {t.number for t in counted} <= {t.number for t in tracked}
    client = runner.tracker.client
    parent = client.get_run(done.result.mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(trial_info(t)["run_id"] for t in tracked)
    status = {r.info.run_id: r.info.status for r in children}
    assert all(status[trial_info(t)["run_id"]] == ("FINISHED" if t.state == TrialState.COMPLETE else "KILLED")
               for t in tracked)


def test_cancel_stops_the_ray_tasks_within_seconds(runner: JobRunner) -> None:
    import ray

    job = runner.store.submit(_spec(200), "alice")
    driver = threading.Thread(target=runner.run, args=(runner.store.claim("driver"),), daemon=True)
    driver.start()
    deadline = time.monotonic() + 60
    on_ray: list[optuna.trial.FrozenTrial] = []
    while not on_ray:
        assert time.monotonic() < deadline and driver.is_alive(), "no trial started in a Ray worker"
        time.sleep(0.2)
        try:
            running = _study(runner, job.job_id).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            continue
        on_ray = [t for t in running if trial_info(t).get("worker", "").startswith("ray:")]
    assert ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]  # held by the helper task
    cancelled = time.monotonic()
    runner.store.cancel(job.job_id)
    driver.join(30)
    assert runner.store.get(job.job_id).state == JobState.CANCELLED
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() - cancelled < 15, "the job's Ray task still runs"
        time.sleep(0.2)
    print(f"\ncancelled; the job's Ray task had ended after {time.monotonic() - cancelled:.1f} s")
    assert runner.store.live_helpers(job.job_id) == 0
    # Trials in flight ended FAIL (stopped at a report) or COMPLETE (done before their worker's next
    # heartbeat saw the cancel); every trial's MLflow run is closed.
    trials = _study(runner, job.job_id).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    client = runner.tracker.client
    assert all(client.get_run(trial_info(t)["run_id"]).info.status != "RUNNING"
               for t in trials if "run_id" in trial_info(t))
