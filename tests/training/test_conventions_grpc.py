"""The training service's lists and creates follow the platform's conventions
(services/common/paging.py, idempotency.py), through gRPC against a real training service."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from strata.training.v1 import training_pb2 as pb

from tests.conventions import check_page_policy, refused_field, two_pages
from tests.processes import stop_process
from tests.training.conftest import Platform, breast_cancer, start_platform


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """No workers: submitted jobs stay QUEUED, which is all a list needs."""
    p = start_platform(tmp_path_factory.mktemp("training-conventions"), workers=0)
    breast_cancer(p.store / "data" / "bc.parquet")
    try:
        yield p
    finally:
        for proc in reversed(p.procs):
            stop_process(proc)


def _spec(model: str = "conv") -> pb.TrainingJobSpec:
    return pb.TrainingJobSpec(dataset=pb.Dataset(table=pb.TableDataset(uri="data/bc.parquet"), label_column="target"),
                              task=pb.TASK_CLASSIFICATION, trainer=pb.Trainer(family="linear"),
                              registration=pb.Registration(model_name=model))


def test_jobs_page_in_two_pages_newest_first(idle: Platform) -> None:
    stub = idle.training()
    made = [stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=_spec())).job.job_id for _ in range(5)]

    def jobs(**kw):
        return stub.ListTrainingJobs(pb.ListTrainingJobsRequest(state=pb.JOB_STATE_QUEUED, **kw))
    ids, token = two_pages(jobs, "jobs", lambda j: j.job_id, 3)
    assert ids[:5] == made[::-1]
    check_page_policy(jobs, "bm90LWEtdG9rZW4")
    # the same token with another filter is refused
    assert refused_field(lambda: stub.ListTrainingJobs(pb.ListTrainingJobsRequest(
        state=pb.JOB_STATE_RUNNING, page_size=3, page_token=token))) == "page_token"
    assert refused_field(lambda: stub.ListTrainingJobs(pb.ListTrainingJobsRequest(state=99))) == "state"


def test_submit_is_idempotent_by_request_id(idle: Platform) -> None:
    stub = idle.training()
    first = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=_spec("idem"), request_id="conv-1")).job
    again = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=_spec("idem"), request_id="conv-1")).job
    assert again.job_id == first.job_id and again.create_time == first.create_time
    assert refused_field(lambda: stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(
        spec=_spec("other"), request_id="conv-1"))) == "request_id"
    assert refused_field(lambda: stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(
        spec=_spec("idem"), request_id="has space"))) == "request_id"


def test_runs_and_experiments_page_with_bound_tokens(idle: Platform) -> None:
    stub = idle.training()
    assert refused_field(lambda: stub.SearchRuns(pb.SearchRunsRequest(page_size=501))) == "page_size"
    assert refused_field(lambda: stub.ListExperiments(pb.ListExperimentsRequest(page_token="bm90"))) == "page_token"
    with pytest.raises(grpc.RpcError) as e:
        stub.GetRun(pb.GetRunRequest(run_id="0" * 32))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
