"""gRPC servicer of strata.features.v1.FeatureService: translation only. Each method converts
the request (convert.py), calls the data plane (dataplane.py, which decides where the work runs)
and converts the answer back."""

from __future__ import annotations

from strata.features.v1 import features_pb2 as pb
from strata.features.v1 import features_pb2_grpc

from services.common.audit import current_resource
from services.common.auth import current_principal
from services.features import convert
from services.features.dataplane import FeatureDataPlane


class FeatureServicer(features_pb2_grpc.FeatureServiceServicer):
    def __init__(self, plane: FeatureDataPlane) -> None:
        self.plane = plane

    async def ApplyEntity(self, request: pb.ApplyEntityRequest, context) -> pb.ApplyEntityResponse:  # noqa: ANN001, N802
        current_resource.set(f"entities/{request.entity.name}")
        entity = await self.plane.apply_entity(convert.entity(request.entity))
        return pb.ApplyEntityResponse(entity=convert.entity_pb(entity))

    async def ListEntities(self, request: pb.ListEntitiesRequest, context) -> pb.ListEntitiesResponse:  # noqa: ANN001, N802
        entities, token = await self.plane.list_entities(request.page_size, request.page_token)
        return pb.ListEntitiesResponse(entities=[convert.entity_pb(e) for e in entities], next_page_token=token)

    async def ApplyFeatureView(self, request: pb.ApplyFeatureViewRequest, context) -> pb.ApplyFeatureViewResponse:  # noqa: ANN001, N802
        current_resource.set(f"featureViews/{request.feature_view.name}")
        view, outcome = await self.plane.apply_view(convert.feature_view(request.feature_view),
                                                    current_principal.get().subject)
        return pb.ApplyFeatureViewResponse(feature_view=convert.feature_view_pb(view), outcome=outcome)

    async def ApplyFeatureSet(self, request: pb.ApplyFeatureSetRequest, context) -> pb.ApplyFeatureSetResponse:  # noqa: ANN001, N802
        current_resource.set(f"featureSets/{request.feature_set.name}")
        fs, outcome = await self.plane.apply_feature_set(convert.feature_set(request.feature_set))
        return pb.ApplyFeatureSetResponse(feature_set=convert.feature_set_pb(fs), outcome=outcome)

    async def GetFeatureSet(self, request: pb.GetFeatureSetRequest, context) -> pb.GetFeatureSetResponse:  # noqa: ANN001, N802
        return pb.GetFeatureSetResponse(feature_set=convert.feature_set_pb(await self.plane.get_feature_set(
            request.name)))

    async def ListFeatureSets(self, request: pb.ListFeatureSetsRequest, context) -> pb.ListFeatureSetsResponse:  # noqa: ANN001, N802
        sets, token = await self.plane.list_feature_sets(request.page_size, request.page_token)
        return pb.ListFeatureSetsResponse(feature_sets=[convert.feature_set_pb(s) for s in sets],
                                          next_page_token=token)

    async def GetFeatureView(self, request: pb.GetFeatureViewRequest, context) -> pb.GetFeatureViewResponse:  # noqa: ANN001, N802
        view = await self.plane.get_view(request.name, request.version)
        return pb.GetFeatureViewResponse(feature_view=convert.feature_view_pb(view))

    async def ListFeatureViews(self, request: pb.ListFeatureViewsRequest, context) -> pb.ListFeatureViewsResponse:  # noqa: ANN001, N802
        views, token = await self.plane.list_views(
            query=request.query, tag=request.tag, owner=request.owner, entity=request.entity,
            page_size=request.page_size, page_token=request.page_token)
        return pb.ListFeatureViewsResponse(feature_views=[convert.feature_view_pb(v) for v in views],
                                           next_page_token=token)

    async def ListFeatureViewVersions(self, request: pb.ListFeatureViewVersionsRequest, context) -> pb.ListFeatureViewVersionsResponse:  # noqa: ANN001, N802, E501
        views, token = await self.plane.list_view_versions(request.name, request.page_size, request.page_token)
        return pb.ListFeatureViewVersionsResponse(feature_views=[convert.feature_view_pb(v) for v in views],
                                                  next_page_token=token)

    async def GetOnlineFeatures(self, request: pb.GetOnlineFeaturesRequest, context) -> pb.GetOnlineFeaturesResponse:  # noqa: ANN001, N802
        # Raw answers come back already serialized (wire.py); the server sends bytes as they are.
        return convert.online_response(await self.plane.get_online(convert.online_query(request)))

    async def PushFeatures(self, request: pb.PushFeaturesRequest, context) -> pb.PushFeaturesResponse:  # noqa: ANN001, N802
        current_resource.set(f"featureViews/{request.view}")
        return convert.push_response(await self.plane.push(convert.push_request(request)))

    async def Materialize(self, request: pb.MaterializeRequest, context):  # noqa: ANN001, ANN201, N802
        current_resource.set(f"featureViews/{request.view}")
        async for progress in self.plane.materialize(request.view, request.start_us, request.end_us):
            yield convert.materialize_response(progress)

    async def GetFeatureStatistics(self, request: pb.GetFeatureStatisticsRequest, context) -> pb.GetFeatureStatisticsResponse:  # noqa: ANN001, N802, E501
        return convert.statistics_response(await self.plane.statistics(request.view, request.version))

    async def GetHistoricalFeatures(self, request: pb.GetHistoricalFeaturesRequest, context):  # noqa: ANN001, ANN201, N802
        async for part in self.plane.historical_features(convert.historical_query(request)):
            yield convert.historical_response(part)

    async def CreateTrainingSet(self, request: pb.CreateTrainingSetRequest, context) -> pb.CreateTrainingSetResponse:  # noqa: ANN001, N802, E501
        current_resource.set(f"trainingSets/{request.output_uri[:256]}")
        dataset = await self.plane.create_training_set(convert.training_set_request(request),
                                                       current_principal.get().subject)
        return pb.CreateTrainingSetResponse(dataset=convert.dataset_pb(dataset))
