"""The inference service's lists and creates follow the platform's conventions
(services/common/paging.py, idempotency.py), through gRPC against the running service."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from strata.inference.v1 import inference_pb2 as pb

from tests.conventions import check_page_policy, refused_field, two_pages
from tests.inference.conftest import Inference, policy


def test_endpoints_and_policy_revisions_page_in_two_pages(inference: Inference) -> None:
    stub = inference.stub()
    tag = os.urandom(3).hex()
    for i in range(3):
        stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(
            name=f"pg-{tag}-{i}", policy=policy(("mlp", 1, 100)))))

    def endpoints(**kw):  # noqa: ANN003, ANN202
        return stub.ListEndpoints(pb.ListEndpointsRequest(**kw))
    everything = [e.name for e in endpoints(page_size=500).endpoints]
    names, token = two_pages(endpoints, "endpoints", lambda e: e.name, (len(everything) + 1) // 2)
    assert names == everything == sorted(everything)
    check_page_policy(endpoints, "bm90LWEtdG9rZW4")

    name = f"pg-{tag}-0"
    for v in (2, 3):
        stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint=name, policy=policy(("mlp", v, 100))))

    def revisions(**kw):  # noqa: ANN003, ANN202
        return stub.ListPolicyRevisions(pb.ListPolicyRevisionsRequest(**kw))
    numbers, rev_token = two_pages(revisions, "revisions", lambda r: r.revision, 2, endpoint=name)
    assert numbers == [3, 2, 1]
    check_page_policy(revisions, rev_token, endpoint=f"pg-{tag}-1")
    assert refused_field(lambda: endpoints(page_token=rev_token)) == "page_token"  # another list's token

    def loaded(**kw):  # noqa: ANN003, ANN202
        return stub.ListLoadedModels(pb.ListLoadedModelsRequest(**kw))
    models = [(m.model, m.version) for m in loaded(page_size=500).models]
    assert len(models) >= 3  # mlp 1, 2, 3 were loaded for the policies above
    keys, token = two_pages(loaded, "models", lambda m: (m.model, m.version), (len(models) + 1) // 2)
    assert keys == sorted(models)
    check_page_policy(loaded, rev_token)


def test_batch_jobs_page_in_two_pages(inference: Inference, tmp_path: Path) -> None:
    stub = inference.stub()
    pq.write_table(pa.table({"input": [[0.0] * 32]}), tmp_path / "in.parquet")
    for i in range(3):
        stub.CreateBatchJob(pb.CreateBatchJobRequest(job=pb.BatchJob(
            model="mlp", version=1, input_uri=str(tmp_path / "in.parquet"), output_uri=str(tmp_path / f"o{i}.parquet"))))

    def jobs(**kw):  # noqa: ANN003, ANN202
        return stub.ListBatchJobs(pb.ListBatchJobsRequest(**kw))
    everything = [j.job_id for j in jobs(page_size=500).jobs]
    ids, token = two_pages(jobs, "jobs", lambda j: j.job_id, (len(everything) + 1) // 2)
    assert ids == everything == sorted(everything, reverse=True)
    check_page_policy(jobs, "bm90LWEtdG9rZW4")
    assert refused_field(lambda: stub.ListEndpoints(pb.ListEndpointsRequest(page_token=token))) == "page_token"


def test_retried_creates_return_the_first_result_and_reused_ids_are_refused(inference: Inference,
                                                                            tmp_path: Path) -> None:
    stub = inference.stub()
    name = f"idem-{os.urandom(3).hex()}"
    req = pb.CreateEndpointRequest(endpoint=pb.Endpoint(name=name, policy=policy(("mlp", 1, 100))),
                                   request_id=f"create-{name}")
    first = stub.CreateEndpoint(req).endpoint
    assert stub.CreateEndpoint(req).endpoint == first  # not ALREADY_EXISTS: the first result
    other = pb.CreateEndpointRequest(endpoint=pb.Endpoint(name=name, policy=policy(("mlp", 2, 100))),
                                     request_id=req.request_id)
    assert refused_field(lambda: stub.CreateEndpoint(other)) == "request_id"
    other.request_id = "x" * 129
    assert refused_field(lambda: stub.CreateEndpoint(other)) == "request_id"

    pq.write_table(pa.table({"input": [[0.0] * 32]}), tmp_path / "in.parquet")
    job = pb.BatchJob(model="mlp", version=1, input_uri=str(tmp_path / "in.parquet"),
                      output_uri=str(tmp_path / "out.parquet"))
    jreq = pb.CreateBatchJobRequest(job=job, request_id=f"job-{name}")
    first_job = stub.CreateBatchJob(jreq).job
    assert stub.CreateBatchJob(jreq).job.job_id == first_job.job_id  # one job, not two
    jreq.job.version = 2
    assert refused_field(lambda: stub.CreateBatchJob(jreq)) == "request_id"
