"""A worker killed with SIGKILL mid-study: another worker resumes the job from the same Optuna
study and MLflow run, and the study ends with exactly n_trials trials complete or pruned (the dead
worker's running trial is failed by its missing heartbeat and retried once, never counted)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import optuna
import pytest
from strata.training.v1 import training_pb2 as pb

from services.training.runner import trial_info
from tests.processes import stop_process
from tests.training.conftest import Platform, breast_cancer, start_platform
from tests.training.test_training_grpc import wait

pytestmark = pytest.mark.e2e


@pytest.fixture
def bare(tmp_path) -> Iterator[Platform]:
    p = start_platform(tmp_path, workers=0)
    try:
        yield p
    finally:
        for proc in reversed(p.procs):
            if proc.poll() is None:
                stop_process(proc)


def test_a_killed_worker_leaves_the_job_to_another_with_exact_trial_counts(bare: Platform) -> None:
    breast_cancer(bare.store / "data" / "bc.parquet")
    stub = bare.training()
    n = 12
    spec = pb.TrainingJobSpec(
        dataset=pb.Dataset(table=pb.TableDataset(uri="data/bc.parquet"), label_column="target"),
        task=pb.TASK_CLASSIFICATION, trainer=pb.Trainer(family="random_forest"),
        hpo=pb.Hpo(n_trials=n, pruner="none", search_space=[
            pb.Param(name="n_estimators", int_range=pb.IntRange(low=40, high=80))]),
        registration=pb.Registration(model_name="bc-crash"))
    job = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec)).job
    first = bare.start_worker()
    deadline = time.monotonic() + 120
    while stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.job_id)).job.progress.trials_done < 3:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)  # mid-study, most likely inside a trial
    first.wait()
    bare.start_worker()
    done = wait(stub, job.job_id, timeout=240)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.attempts == 2 and done.result.model_version == 1
    study = optuna.load_study(study_name=f"job-{job.job_id}", storage=f"sqlite:///{bare.home / 'training.db'}")
    counted = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    print(f"\ntrials: {len(counted)} complete/pruned, {len(failed)} failed (the killed worker's), "
          f"{len(study.trials)} in all")
    assert len(counted) == n and done.progress.trials_done == n
    assert len(failed) <= 1 and not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_two_workers_share_one_study(bare: Platform) -> None:
    breast_cancer(bare.store / "data" / "bc-par.parquet")
    stub = bare.training()
    n = 12
    spec = pb.TrainingJobSpec(
        dataset=pb.Dataset(table=pb.TableDataset(uri="data/bc-par.parquet"), label_column="target"),
        task=pb.TASK_CLASSIFICATION, trainer=pb.Trainer(family="random_forest"),
        hpo=pb.Hpo(n_trials=n, parallelism=2, pruner="none", search_space=[
            pb.Param(name="n_estimators", int_range=pb.IntRange(low=40, high=80))]),
        registration=pb.Registration(model_name="bc-parallel"))
    bare.start_worker()
    bare.start_worker()
    job = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec)).job
    done = wait(stub, job.job_id, timeout=240)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    study = optuna.load_study(study_name=f"job-{job.job_id}", storage=f"sqlite:///{bare.home / 'training.db'}")
    counted = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    workers = {trial_info(t)["worker"] for t in counted}
    print(f"\n{len(counted)} trials counted, run by {len(workers)} workers; {len(study.trials)} in all")
    assert len(workers) == 2
    # A helper's trial in flight when the study reaches n_trials is stopped (FAIL, not counted); one that
    # finished in the same instant may add one.
    assert n <= len(counted) <= n + 1
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_a_worker_killed_while_registering_leaves_one_whole_version(bare: Platform) -> None:
    """SIGKILL in the registration stage (a ~20 MB forest uploads in chunks): the next worker
    resumes the job, the registration resumes under the job's request id, and the registry shows
    exactly one version, complete."""
    from strata.registry.v1 import registry_pb2 as rpb

    from tests.training.conftest import diabetes

    diabetes(bare.store / "data" / "db.parquet")
    stub = bare.training()
    spec = pb.TrainingJobSpec(
        dataset=pb.Dataset(table=pb.TableDataset(uri="data/db.parquet"), label_column="target"),
        task=pb.TASK_REGRESSION, trainer=pb.Trainer(family="random_forest"),
        registration=pb.Registration(model_name="db-crash"))
    spec.trainer.params.update({"n_estimators": 400})
    job = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec)).job
    first = bare.start_worker()
    deadline = time.monotonic() + 180
    while stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=job.job_id)).job.progress.stage != "registering":
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    reg = bare.registry()
    seen = [v.version for v in reg.ListModelVersions(rpb.ListModelVersionsRequest(name="db-crash")).model_versions] \
        if reg.ListRegisteredModels(rpb.ListRegisteredModelsRequest()).registered_models else []
    print(f"\nkilled while registering; versions visible right after the kill: {seen}")
    assert seen in ([], [1])  # a version is visible only once its artifact is committed
    bare.start_worker()
    done = wait(stub, job.job_id, timeout=240)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.attempts == 2, done.error
    versions = reg.ListModelVersions(rpb.ListModelVersionsRequest(name="db-crash")).model_versions
    assert [v.version for v in versions] == [1] and done.result.model_version == 1
    v = versions[0]
    assert v.status == rpb.MODEL_VERSION_STATUS_READY and v.artifact.sha256 and v.lineage.training_job_id == job.job_id
