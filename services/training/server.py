"""gRPC servicer of strata.training.v1.TrainingService: proto <-> domain only; the facade
(dataplane.py) decides."""

from __future__ import annotations

from strata.training.v1 import training_pb2 as pb
from strata.training.v1 import training_pb2_grpc

from services.common.audit import current_resource
from services.common.auth import current_principal
from services.training import convert
from services.training.dataplane import TrainingDataPlane


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, plane: TrainingDataPlane) -> None:
        self.plane = plane

    async def SubmitTrainingJob(self, request: pb.SubmitTrainingJobRequest, context) -> pb.SubmitTrainingJobResponse:
        current_resource.set("training/jobs")
        job = await self.plane.submit(convert.spec_from_pb(request.spec), current_principal.get().subject,
                                      request.request_id)
        current_resource.set(f"training/jobs/{job.job_id}")
        return pb.SubmitTrainingJobResponse(job=convert.job_pb(job))

    async def GetTrainingJob(self, request: pb.GetTrainingJobRequest, context) -> pb.GetTrainingJobResponse:
        return pb.GetTrainingJobResponse(job=convert.job_pb(await self.plane.get(request.job_id)))

    async def ListTrainingJobs(self, request: pb.ListTrainingJobsRequest, context) -> pb.ListTrainingJobsResponse:
        jobs, token = await self.plane.list(convert.state_from_pb(request.state), request.page_size,
                                            request.page_token)
        return pb.ListTrainingJobsResponse(jobs=[convert.job_pb(j) for j in jobs], next_page_token=token)

    async def CancelTrainingJob(self, request: pb.CancelTrainingJobRequest, context) -> pb.CancelTrainingJobResponse:
        current_resource.set(f"training/jobs/{request.job_id[:64]}")
        return pb.CancelTrainingJobResponse(job=convert.job_pb(await self.plane.cancel(request.job_id)))

    async def WatchTrainingJob(self, request: pb.WatchTrainingJobRequest, context):
        async for job in self.plane.watch(request.job_id):
            yield pb.WatchTrainingJobResponse(job=convert.job_pb(job))

    async def CreateSchedule(self, request: pb.CreateScheduleRequest, context) -> pb.CreateScheduleResponse:
        current_resource.set("training/schedules")
        s = request.schedule
        created = await self.plane.create_schedule(s.description, s.cron, convert.spec_from_pb(s.spec),
                                                   current_principal.get().subject, request.request_id)
        current_resource.set(f"training/schedules/{created.schedule_id}")
        return pb.CreateScheduleResponse(schedule=convert.schedule_pb(created))

    async def ListSchedules(self, request: pb.ListSchedulesRequest, context) -> pb.ListSchedulesResponse:
        items, token = await self.plane.schedules_page(request.page_size, request.page_token)
        return pb.ListSchedulesResponse(schedules=[convert.schedule_pb(s) for s in items], next_page_token=token)

    async def PauseSchedule(self, request: pb.PauseScheduleRequest, context) -> pb.PauseScheduleResponse:
        current_resource.set(f"training/schedules/{request.schedule_id[:64]}")
        s = await self.plane.pause_schedule(request.schedule_id, request.paused)
        return pb.PauseScheduleResponse(schedule=convert.schedule_pb(s))

    async def DeleteSchedule(self, request: pb.DeleteScheduleRequest, context) -> pb.DeleteScheduleResponse:
        current_resource.set(f"training/schedules/{request.schedule_id[:64]}")
        await self.plane.delete_schedule(request.schedule_id)
        return pb.DeleteScheduleResponse()

    async def TriggerSchedule(self, request: pb.TriggerScheduleRequest, context) -> pb.TriggerScheduleResponse:
        current_resource.set(f"training/schedules/{request.schedule_id[:64]}")
        job = await self.plane.trigger(request.schedule_id, current_principal.get().subject, request.reason,
                                       request.request_id)
        return pb.TriggerScheduleResponse(job=convert.job_pb(job))

    async def ListExperiments(self, request: pb.ListExperimentsRequest, context) -> pb.ListExperimentsResponse:
        items, token = await self.plane.experiments(request.page_size, request.page_token)
        return pb.ListExperimentsResponse(experiments=[convert.experiment_pb(e) for e in items], next_page_token=token)

    async def SearchRuns(self, request: pb.SearchRunsRequest, context) -> pb.SearchRunsResponse:
        runs, token = await self.plane.search_runs(list(request.experiment_ids), request.filter, list(request.order_by),
                                                   request.page_size, request.page_token)
        return pb.SearchRunsResponse(runs=[convert.run_pb(r) for r in runs], next_page_token=token)

    async def GetRun(self, request: pb.GetRunRequest, context) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=convert.run_pb(await self.plane.get_run(request.run_id)))

    async def CompareRuns(self, request: pb.CompareRunsRequest, context) -> pb.CompareRunsResponse:
        return convert.comparison_pb(await self.plane.compare(list(request.run_ids)))
