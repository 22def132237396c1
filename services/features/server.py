"""gRPC servicer of strata.features.v1.FeatureService: proto <-> domain only. Blocking work
(database, online store) runs in worker threads so the event loop keeps accepting calls."""

from __future__ import annotations

import asyncio

from strata.features.v1 import features_pb2 as pb
from strata.features.v1 import features_pb2_grpc

from services.common.audit import current_resource
from services.common.auth import current_principal
from services.common.limits import check_version
from services.features.definitions import Definitions
from services.features.files import OfflineFiles
from services.features.historical import HistoricalRetrieval
from services.features.materialize import Materializer
from services.features.serving import FeatureServer
from services.features.training_sets import TrainingSets


class FeatureServicer(features_pb2_grpc.FeatureServiceServicer):
    def __init__(self, definitions: Definitions, server: FeatureServer, materializer: Materializer,
                 historical: HistoricalRetrieval, training_sets: TrainingSets, files: OfflineFiles) -> None:
        self.definitions = definitions
        self.server = server
        self.materializer = materializer
        self.historical = historical
        self.training_sets = training_sets
        self.files = files  # where view sources may live (checked at apply)

    async def ApplyEntity(self, request: pb.ApplyEntityRequest, context) -> pb.ApplyEntityResponse:  # noqa: ANN001, N802
        current_resource.set(f"entities/{request.entity.name}")
        return pb.ApplyEntityResponse(entity=await asyncio.to_thread(self.definitions.apply_entity, request.entity))

    async def ListEntities(self, request: pb.ListEntitiesRequest, context) -> pb.ListEntitiesResponse:  # noqa: ANN001, N802
        entities, token = await asyncio.to_thread(self.definitions.entities, request.page_size, request.page_token)
        return pb.ListEntitiesResponse(entities=entities, next_page_token=token)

    async def ApplyFeatureView(self, request: pb.ApplyFeatureViewRequest, context) -> pb.ApplyFeatureViewResponse:  # noqa: ANN001, N802
        current_resource.set(f"featureViews/{request.feature_view.name}")
        if request.feature_view.source.path:  # a source this service may not read is refused now, not at first use
            self.files.locate(request.feature_view.source.path, "feature_view.source.path")
        view, outcome = await asyncio.to_thread(self.definitions.apply_view, request.feature_view,
                                                current_principal.get().subject)
        self.server.views.drop(view.name)
        return pb.ApplyFeatureViewResponse(feature_view=view, outcome=outcome)

    async def ApplyFeatureSet(self, request: pb.ApplyFeatureSetRequest, context) -> pb.ApplyFeatureSetResponse:  # noqa: ANN001, N802
        current_resource.set(f"featureSets/{request.feature_set.name}")
        fs, outcome = await asyncio.to_thread(self.definitions.apply_feature_set, request.feature_set)
        self.server.sets.drop(fs.name)
        return pb.ApplyFeatureSetResponse(feature_set=fs, outcome=outcome)

    async def GetFeatureSet(self, request: pb.GetFeatureSetRequest, context) -> pb.GetFeatureSetResponse:  # noqa: ANN001, N802
        return pb.GetFeatureSetResponse(feature_set=await asyncio.to_thread(self.definitions.get_feature_set,
                                                                            request.name))

    async def ListFeatureSets(self, request: pb.ListFeatureSetsRequest, context) -> pb.ListFeatureSetsResponse:  # noqa: ANN001, N802
        sets, token = await asyncio.to_thread(self.definitions.feature_sets, request.page_size, request.page_token)
        return pb.ListFeatureSetsResponse(feature_sets=sets, next_page_token=token)

    async def GetFeatureView(self, request: pb.GetFeatureViewRequest, context) -> pb.GetFeatureViewResponse:  # noqa: ANN001, N802
        check_version(request.version, "version", optional=True)
        view = await asyncio.to_thread(self.definitions.get_view, request.name, request.version)
        return pb.GetFeatureViewResponse(feature_view=view.spec)

    async def ListFeatureViews(self, request: pb.ListFeatureViewsRequest, context) -> pb.ListFeatureViewsResponse:  # noqa: ANN001, N802
        views, token = await asyncio.to_thread(
            self.definitions.list_views, query=request.query, tag=request.tag, owner=request.owner,
            entity=request.entity, size=request.page_size, token=request.page_token)
        return pb.ListFeatureViewsResponse(feature_views=views, next_page_token=token)

    async def ListFeatureViewVersions(self, request: pb.ListFeatureViewVersionsRequest, context) -> pb.ListFeatureViewVersionsResponse:  # noqa: ANN001, N802, E501
        views, token = await asyncio.to_thread(self.definitions.versions, request.name, request.page_size,
                                               request.page_token)
        return pb.ListFeatureViewVersionsResponse(feature_views=views, next_page_token=token)

    async def GetOnlineFeatures(self, request: pb.GetOnlineFeaturesRequest, context) -> pb.GetOnlineFeaturesResponse:  # noqa: ANN001, N802
        # Redis: read on the event loop, pipelined with the other calls in flight. SQLite: the
        # whole read in a worker thread (blocking file I/O must not stall the loop).
        # Raw answers come back already serialized (see wire.py); the server sends bytes as they are.
        if self.server.store.async_reads:
            return await self.server.get_online_async(request, encoded=True)
        return await asyncio.to_thread(self.server.get_online, request, True)

    async def PushFeatures(self, request: pb.PushFeaturesRequest, context) -> pb.PushFeaturesResponse:  # noqa: ANN001, N802
        current_resource.set(f"featureViews/{request.view}")
        return await asyncio.to_thread(self.server.push, request)

    async def Materialize(self, request: pb.MaterializeRequest, context):  # noqa: ANN001, ANN201, N802
        current_resource.set(f"featureViews/{request.view}")
        steps = self.materializer.run(request.view, request.start_us, request.end_us)  # a generator: lazy
        while True:
            progress = await asyncio.to_thread(next, steps, None)  # each chunk's work off the event loop
            if progress is None:
                return
            out = pb.MaterializeResponse()
            out.CopyFrom(progress)
            yield out

    async def GetFeatureStatistics(self, request: pb.GetFeatureStatisticsRequest, context) -> pb.GetFeatureStatisticsResponse:  # noqa: ANN001, N802, E501
        check_version(request.version, "version", optional=True)
        return await asyncio.to_thread(self.materializer.statistics, request.view, request.version)

    async def GetHistoricalFeatures(self, request: pb.GetHistoricalFeaturesRequest, context):  # noqa: ANN001, ANN201, N802
        parts = self.historical.run(request)  # a generator: the join runs in the first next()
        while True:
            part = await asyncio.to_thread(next, parts, None)
            if part is None:
                return
            yield part

    async def CreateTrainingSet(self, request: pb.CreateTrainingSetRequest, context) -> pb.CreateTrainingSetResponse:  # noqa: ANN001, N802, E501
        current_resource.set(f"trainingSets/{request.output_uri[:256]}")
        dataset = await asyncio.to_thread(self.training_sets.create, request, current_principal.get().subject)
        return pb.CreateTrainingSetResponse(dataset=dataset)
