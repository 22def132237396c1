"""gRPC side of the batch jobs (strata.inference.v1.InferenceService's batch job RPCs):
translation between the protos and services/inference/batch_jobs/ only."""

from __future__ import annotations

import asyncio

from strata.inference.v1 import inference_pb2 as pb

from services.common.audit import current_resource
from services.common.auth import current_principal
from services.common.convert import timestamp_pb
from services.common.errors import InvalidArgument
from services.inference.batch_jobs.runner import BatchRunner
from services.inference.batch_jobs.store import BatchJobRecord, BatchJobState, BatchJobStore, validate_job

_STATE_PB = {
    BatchJobState.PENDING: pb.BATCH_JOB_STATE_PENDING,
    BatchJobState.RUNNING: pb.BATCH_JOB_STATE_RUNNING,
    BatchJobState.SUCCEEDED: pb.BATCH_JOB_STATE_SUCCEEDED,
    BatchJobState.FAILED: pb.BATCH_JOB_STATE_FAILED,
    BatchJobState.CANCELLED: pb.BATCH_JOB_STATE_CANCELLED,
}


def job_pb(r: BatchJobRecord) -> pb.BatchJob:
    return pb.BatchJob(
        job_id=r.job_id, model=r.model, version=r.version, alias=r.alias, input_uri=r.input_uri,
        output_uri=r.output_uri, input_columns=list(r.input_columns), state=_STATE_PB[r.state],
        rows_total=r.rows_total or 0, rows_done=r.rows_done, error=r.error, created_by=r.created_by,
        create_time=timestamp_pb(r.create_time), update_time=timestamp_pb(r.update_time),
        chunk_rows=r.chunk_rows)


class BatchJobsServicer:
    """The batch job RPCs, mixed into the InferenceService servicer. Attribute names are
    prefixed so they do not collide with the host class's."""

    def __init__(self, jobs: BatchJobStore, runner: BatchRunner) -> None:
        self.batch_jobs = jobs
        self.batch_runner = runner

    async def CreateBatchJob(self, request: pb.CreateBatchJobRequest,  # noqa: N802
                             context) -> pb.CreateBatchJobResponse:  # noqa: ANN001
        j, rid = request.job, request.request_id
        spec = {"model": j.model, "version": j.version, "alias": j.alias, "input_uri": j.input_uri,
                "output_uri": j.output_uri, "input_columns": list(j.input_columns), "chunk_rows": j.chunk_rows}
        validate_job(**spec)
        principal = current_principal.get().subject
        if (prior := await asyncio.to_thread(self.batch_jobs.created, principal, rid, spec)) is not None:
            current_resource.set(f"batchJobs/{prior.job_id}")  # a retry: the first job
            return pb.CreateBatchJobResponse(job=job_pb(prior))
        # Fail fast on what would only fail the job later: an unknown model, a missing input.
        self.batch_runner.check_paths(j.input_uri, j.output_uri)  # before anything looks at the host
        ref = await self.batch_runner.models.resolve(j.model, j.version, j.alias)
        if not await asyncio.to_thread(self.batch_runner.input_exists, j.input_uri):
            raise InvalidArgument("job.input_uri", f"no file at '{j.input_uri}'")
        rec, created = await asyncio.to_thread(
            self.batch_jobs.create, **spec, principal=principal,
            worker_id=self.batch_runner.worker_id, request_id=rid, resolved_version=ref.version)
        current_resource.set(f"batchJobs/{rec.job_id}")
        if created:
            await self.batch_runner.submit(rec.job_id)
        return pb.CreateBatchJobResponse(job=job_pb(rec))

    async def GetBatchJob(self, request: pb.GetBatchJobRequest,  # noqa: N802
                          context) -> pb.GetBatchJobResponse:  # noqa: ANN001
        rec = await asyncio.to_thread(self.batch_jobs.get, request.job_id)
        return pb.GetBatchJobResponse(job=job_pb(rec))

    async def ListBatchJobs(self, request: pb.ListBatchJobsRequest,  # noqa: N802
                            context) -> pb.ListBatchJobsResponse:  # noqa: ANN001
        jobs, token = await asyncio.to_thread(self.batch_jobs.list, request.page_size, request.page_token)
        return pb.ListBatchJobsResponse(jobs=[job_pb(r) for r in jobs], next_page_token=token)

    async def CancelBatchJob(self, request: pb.CancelBatchJobRequest,  # noqa: N802
                             context) -> pb.CancelBatchJobResponse:  # noqa: ANN001
        current_resource.set(f"batchJobs/{request.job_id}")
        rec = await asyncio.to_thread(self.batch_jobs.cancel, request.job_id)
        return pb.CancelBatchJobResponse(job=job_pb(rec))
