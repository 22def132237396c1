"""gRPC servicer of strata.inference.v1.InferenceService (the V2 protocol is in v2.py).
Translation only: each method converts the request (convert.py, codec.py), awaits the data plane
(dataplane.py) and converts its result back (batch jobs: batch_servicer.py)."""

from __future__ import annotations

from strata.inference.v1 import inference_pb2 as pb
from strata.inference.v1 import inference_pb2_grpc

from services.common.auth import current_principal
from services.inference.batch_jobs import BatchJobStore, BatchRunner
from services.inference.batch_servicer import BatchJobsServicer
from services.inference.convert import (
    endpoint_pb, loaded_pb, policy_from_pb, predict_request, predict_response, revision_pb, status_pb,
    target_stats_pb,
)
from services.inference.dataplane import DataPlane


class InferenceServicer(BatchJobsServicer, inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, plane: DataPlane, jobs: BatchJobStore, runner: BatchRunner) -> None:
        BatchJobsServicer.__init__(self, jobs, runner)
        self.plane = plane

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:  # noqa: ANN001, N802
        plain, raw_used = predict_request(request)
        return predict_response(request, plain, await self.plane.predict(plain), raw_used)

    async def CreateEndpoint(self, request: pb.CreateEndpointRequest, context) -> pb.CreateEndpointResponse:  # noqa: ANN001, N802
        e = request.endpoint
        rec = await self.plane.create_endpoint(e.name, e.description, policy_from_pb(e.policy), e.production,
                                               request.request_id, current_principal.get())
        return pb.CreateEndpointResponse(endpoint=endpoint_pb(rec))

    async def GetEndpoint(self, request: pb.GetEndpointRequest, context) -> pb.GetEndpointResponse:  # noqa: ANN001, N802
        return pb.GetEndpointResponse(endpoint=endpoint_pb(await self.plane.get_endpoint(request.name)))

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context) -> pb.ListEndpointsResponse:  # noqa: ANN001, N802
        recs, token = await self.plane.list_endpoints(request.page_size, request.page_token)
        return pb.ListEndpointsResponse(endpoints=[endpoint_pb(r) for r in recs], next_page_token=token)

    async def UpdateEndpoint(self, request: pb.UpdateEndpointRequest, context) -> pb.UpdateEndpointResponse:  # noqa: ANN001, N802
        e = request.endpoint
        rec = await self.plane.update_endpoint(e.name, set(request.update_mask.paths), e.description, e.production,
                                               current_principal.get())
        return pb.UpdateEndpointResponse(endpoint=endpoint_pb(rec))

    async def DeleteEndpoint(self, request: pb.DeleteEndpointRequest, context) -> pb.DeleteEndpointResponse:  # noqa: ANN001, N802
        await self.plane.delete_endpoint(request.name, current_principal.get())
        return pb.DeleteEndpointResponse()

    async def SetTrafficPolicy(self, request: pb.SetTrafficPolicyRequest, context) -> pb.SetTrafficPolicyResponse:  # noqa: ANN001, N802
        rec = await self.plane.set_policy(request.endpoint, policy_from_pb(request.policy), request.expected_revision,
                                          request.reason, current_principal.get())
        return pb.SetTrafficPolicyResponse(endpoint=endpoint_pb(rec))

    async def RollbackTrafficPolicy(self, request: pb.RollbackTrafficPolicyRequest, context) -> pb.RollbackTrafficPolicyResponse:  # noqa: ANN001, N802, E501
        rec = await self.plane.rollback(request.endpoint, request.expected_revision, current_principal.get())
        return pb.RollbackTrafficPolicyResponse(endpoint=endpoint_pb(rec))

    async def ListPolicyRevisions(self, request: pb.ListPolicyRevisionsRequest, context) -> pb.ListPolicyRevisionsResponse:  # noqa: ANN001, N802, E501
        revs, token = await self.plane.list_revisions(request.endpoint, request.page_size, request.page_token)
        return pb.ListPolicyRevisionsResponse(next_page_token=token, revisions=[revision_pb(r) for r in revs])

    async def GetEndpointStats(self, request: pb.GetEndpointStatsRequest, context) -> pb.GetEndpointStatsResponse:  # noqa: ANN001, N802
        revision, stats = await self.plane.endpoint_stats(request.endpoint)
        return pb.GetEndpointStatsResponse(revision=revision, targets=[target_stats_pb(s) for s in stats])

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:  # noqa: ANN001, N802
        return pb.LoadModelResponse(model=loaded_pb(await self.plane.load_model(request.model, request.version,
                                                                                request.alias)))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:  # noqa: ANN001, N802
        await self.plane.unload_model(request.model, request.version)
        return pb.UnloadModelResponse()

    async def ListLoadedModels(self, request: pb.ListLoadedModelsRequest, context) -> pb.ListLoadedModelsResponse:  # noqa: ANN001, N802
        models, token = self.plane.list_loaded(request.page_size, request.page_token)
        return pb.ListLoadedModelsResponse(models=[status_pb(m) for m in models], next_page_token=token)
