"""gRPC servicer of strata.monitoring.v1.MonitoringService: proto <-> domain only; the facade
(dataplane.py) decides."""

from __future__ import annotations

import grpc
from google.api import httpbody_pb2
from strata.monitoring.v1 import monitoring_pb2 as pb
from strata.monitoring.v1 import monitoring_pb2_grpc

from services.common.audit import current_resource
from services.common.auth import current_principal
from services.monitoring import convert
from services.monitoring.dataplane import MonitoringDataPlane


class MonitoringServicer(monitoring_pb2_grpc.MonitoringServiceServicer):
    def __init__(self, plane: MonitoringDataPlane) -> None:
        self.plane = plane

    async def IngestPredictions(self, request_iterator, context) -> pb.IngestPredictionsResponse:
        # The messages arrive as bytes (see `register`).
        current_resource.set("monitoring/predictions")
        return convert.ingest_pb(await self.plane.ingest(request_iterator, convert.batch))

    async def ReportGroundTruth(self, request: pb.ReportGroundTruthRequest,
                                context) -> pb.ReportGroundTruthResponse:
        current_resource.set("monitoring/labels")
        stored = await self.plane.report_ground_truth(convert.labels(request), current_principal.get().subject)
        return pb.ReportGroundTruthResponse(stored=stored)

    async def SetReference(self, request: pb.SetReferenceRequest, context) -> pb.SetReferenceResponse:
        current_resource.set(f"monitoring/models/{request.model[:128]}/versions/{request.version}/reference")
        ref = await self.plane.set_reference(convert.reference_request(request), current_principal.get().subject)
        return pb.SetReferenceResponse(reference=convert.reference_pb(ref))

    async def GetReference(self, request: pb.GetReferenceRequest, context) -> pb.GetReferenceResponse:
        ref = await self.plane.get_reference(request.model, request.version)
        return pb.GetReferenceResponse(reference=convert.reference_pb(ref))

    async def GetDriftReport(self, request: pb.GetDriftReportRequest, context) -> pb.GetDriftReportResponse:
        return convert.drift_pb(await self.plane.drift(convert.drift_query(request)))

    async def GetDriftReportHtml(self, request: pb.GetDriftReportRequest, context) -> httpbody_pb2.HttpBody:
        return convert.html_pb(await self.plane.drift_html(convert.drift_query(request)))

    async def GetDataQuality(self, request: pb.GetDataQualityRequest, context) -> pb.GetDataQualityResponse:
        return convert.quality_pb(await self.plane.quality(convert.quality_query(request)))

    async def GetPerformance(self, request: pb.GetPerformanceRequest, context) -> pb.GetPerformanceResponse:
        return convert.performance_pb(await self.plane.performance(convert.performance_query(request)))


SERVICE = "strata.monitoring.v1.MonitoringService"


def register(servicer: MonitoringServicer, server: grpc.Server) -> None:
    """The generated registration, with IngestPredictions handed its messages as the bytes received
    (no deserializer): wire.py reads prediction log records from them without a message per
    tensor."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}

    class _Capture:
        def add_generic_rpc_handlers(self, _: object) -> None:
            pass

        def add_registered_method_handlers(self, _: str, found: dict) -> None:
            handlers.update(found)

    monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server(servicer, _Capture())
    ingest = handlers["IngestPredictions"]
    handlers["IngestPredictions"] = grpc.stream_unary_rpc_method_handler(
        ingest.stream_unary, request_deserializer=None, response_serializer=ingest.response_serializer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
