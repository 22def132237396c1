"""gRPC servicer of the registry: translation between protobuf and the domain (domain/)
only. Domain calls are synchronous database/storage work, so they run in worker threads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc
from google.api import httpbody_pb2
from strata.common.v1 import types_pb2
from strata.registry.v1 import registry_pb2 as pb
from strata.registry.v1 import registry_pb2_grpc

from services.common.audit import AuditLog, current_resource
from services.common.auth import current_principal
from services.common.convert import timestamp_pb
from services.common.errors import InvalidArgument
from services.common.limits import check_filter
from services.common.paging import MAX_PAGE_SIZE, PageRequest
from services.registry import domain
from services.registry.card import render_model_card
from services.registry.onnx_check import Signature, TensorSpec

R = TypeVar("R")
_DOWNLOAD_CHUNK = 1 << 20


def model_pb(m: domain.Model) -> pb.RegisteredModel:
    return pb.RegisteredModel(name=m.name, description=m.description, tags=m.tags, owner=m.owner,
                              create_time=timestamp_pb(m.create_time),
                              update_time=timestamp_pb(m.update_time),
                              latest_version=m.latest_version, aliases=m.aliases)


def signature_pb(sig: Signature) -> types_pb2.ModelSignature:
    def spec(t: TensorSpec) -> types_pb2.TensorSpec:
        return types_pb2.TensorSpec(name=t.name, dtype=types_pb2.DataType.Value(f"DATA_TYPE_{t.dtype}"),
                                    shape=list(t.shape))
    return types_pb2.ModelSignature(inputs=[spec(t) for t in sig.inputs], outputs=[spec(t) for t in sig.outputs],
                                    allow_nan=sig.allow_nan)


def signature_from_pb(sig: types_pb2.ModelSignature) -> Signature:
    def spec(t: types_pb2.TensorSpec, field: str) -> TensorSpec:
        if t.dtype not in _DTYPES:  # an enum number this contract does not define
            raise InvalidArgument(f"{field}.dtype", f"{t.dtype} is not a DataType")
        return TensorSpec(t.name, _DTYPES[t.dtype], tuple(t.shape))
    return Signature(tuple(spec(t, f"signature.inputs[{i}]") for i, t in enumerate(sig.inputs)),
                     tuple(spec(t, f"signature.outputs[{i}]") for i, t in enumerate(sig.outputs)), sig.allow_nan)


_DTYPES = {v.number: v.name.removeprefix("DATA_TYPE_") for v in types_pb2.DataType.DESCRIPTOR.values}


def version_pb(v: domain.Version) -> pb.ModelVersion:
    lin = v.lineage
    return pb.ModelVersion(
        name=v.name, version=v.version, framework=v.framework, status=v.status, stage=v.stage,
        description=v.description, tags=v.tags, signature=signature_pb(v.signature), metrics=v.metrics,
        lineage=pb.Lineage(mlflow_run_id=lin.mlflow_run_id, training_job_id=lin.training_job_id,
                           feature_views=lin.feature_views, dataset_hash=lin.dataset_hash,
                           dataset_uri=lin.dataset_uri, feature_set=lin.feature_set, features=lin.features),
        artifact=pb.Artifact(uri=v.artifact_uri, filename=v.filename, size_bytes=v.size_bytes, sha256=v.sha256)
        if v.sha256 else None,
        aliases=v.aliases, created_by=v.created_by,
        create_time=timestamp_pb(v.create_time), update_time=timestamp_pb(v.update_time))


def upload_pb(u: domain.Upload) -> pb.ArtifactUpload:
    return pb.ArtifactUpload(upload_id=u.upload_id, name=u.name, version=u.version, size_bytes=u.size_bytes,
                             received_bytes=u.received_bytes, sha256=u.sha256, filename=u.filename)


def promotion_pb(p: domain.Promotion) -> pb.Promotion:
    return pb.Promotion(promotion_id=p.promotion_id, name=p.name, version=p.version, alias=p.alias, state=p.state,
                        requested_by=p.requested_by, reason=p.reason, decided_by=p.decided_by,
                        decision_comment=p.decision_comment, request_time=timestamp_pb(p.request_time),
                        decision_time=timestamp_pb(p.decision_time))


def _principal() -> str:
    return current_principal.get().subject


def _resource(*parts: object) -> None:
    current_resource.set("/".join(str(p) for p in parts))


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: domain.Registry, audit_log: AuditLog) -> None:
        self.r = registry
        self.audit = audit_log

    @staticmethod
    async def _run(fn: Callable[..., R], *args: object, **kwargs: object) -> R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- models ------------------------------------------------------------------------------
    async def CreateRegisteredModel(self, request: pb.CreateRegisteredModelRequest, context) -> pb.CreateRegisteredModelResponse:
        m = request.registered_model
        _resource("models", m.name)
        created = await self._run(self.r.create_model, domain.Model(
            name=m.name, description=m.description, owner=m.owner, tags=dict(m.tags)), _principal(),
            request.request_id)
        return pb.CreateRegisteredModelResponse(registered_model=model_pb(created))

    async def GetRegisteredModel(self, request: pb.GetRegisteredModelRequest, context) -> pb.GetRegisteredModelResponse:
        return pb.GetRegisteredModelResponse(registered_model=model_pb(await self._run(self.r.get_model, request.name)))

    async def ListRegisteredModels(self, request: pb.ListRegisteredModelsRequest, context) -> pb.ListRegisteredModelsResponse:
        models, token = await self._run(self.r.list_models, query=request.query, owner=request.owner,
                                        tags=list(request.tags), size=request.page_size, token=request.page_token)
        return pb.ListRegisteredModelsResponse(registered_models=[model_pb(m) for m in models], next_page_token=token)

    async def UpdateRegisteredModel(self, request: pb.UpdateRegisteredModelRequest, context) -> pb.UpdateRegisteredModelResponse:
        m = request.registered_model
        _resource("models", m.name)
        updated = await self._run(self.r.update_model, m.name, set(request.update_mask.paths),
                                  description=m.description, owner=m.owner, tags=dict(m.tags))
        return pb.UpdateRegisteredModelResponse(registered_model=model_pb(updated))

    async def DeleteRegisteredModel(self, request: pb.DeleteRegisteredModelRequest, context) -> pb.DeleteRegisteredModelResponse:
        _resource("models", request.name)
        await self._run(self.r.delete_model, request.name)
        return pb.DeleteRegisteredModelResponse()

    # -- versions ----------------------------------------------------------------------------
    async def CreateModelVersion(self, request: pb.CreateModelVersionRequest, context) -> pb.CreateModelVersionResponse:
        _resource("models", request.name, "versions")
        lin = request.lineage
        v = await self._run(
            self.r.create_version, request.name, framework=request.framework, principal=_principal(),
            description=request.description, tags=dict(request.tags), metrics=dict(request.metrics),
            lineage=domain.Lineage(mlflow_run_id=lin.mlflow_run_id, training_job_id=lin.training_job_id,
                                   feature_views=list(lin.feature_views), dataset_hash=lin.dataset_hash,
                                   dataset_uri=lin.dataset_uri, feature_set=lin.feature_set,
                                   features=list(lin.features)),
            signature=signature_from_pb(request.signature), request_id=request.request_id)
        _resource("models", v.name, "versions", v.version)
        return pb.CreateModelVersionResponse(model_version=version_pb(v))

    async def GetModelVersion(self, request: pb.GetModelVersionRequest, context) -> pb.GetModelVersionResponse:
        v = await self._run(self.r.get_version, request.name, request.version)
        return pb.GetModelVersionResponse(model_version=version_pb(v))

    async def ListModelVersions(self, request: pb.ListModelVersionsRequest, context) -> pb.ListModelVersionsResponse:
        versions, token = await self._run(self.r.list_versions, request.name, stage=request.stage,
                                          status=request.status, size=request.page_size, token=request.page_token)
        return pb.ListModelVersionsResponse(model_versions=[version_pb(v) for v in versions], next_page_token=token)

    async def UpdateModelVersion(self, request: pb.UpdateModelVersionRequest, context) -> pb.UpdateModelVersionResponse:
        mv = request.model_version
        _resource("models", mv.name, "versions", mv.version)
        v = await self._run(self.r.update_version, mv.name, mv.version, set(request.update_mask.paths),
                            description=mv.description, tags=dict(mv.tags), metrics=dict(mv.metrics))
        return pb.UpdateModelVersionResponse(model_version=version_pb(v))

    async def DeleteModelVersion(self, request: pb.DeleteModelVersionRequest, context) -> pb.DeleteModelVersionResponse:
        _resource("models", request.name, "versions", request.version)
        await self._run(self.r.delete_version, request.name, request.version)
        return pb.DeleteModelVersionResponse()

    async def TransitionModelVersionStage(self, request: pb.TransitionModelVersionStageRequest,
                                          context) -> pb.TransitionModelVersionStageResponse:
        _resource("models", request.name, "versions", request.version)
        v = await self._run(self.r.transition_stage, request.name, request.version, request.stage)
        return pb.TransitionModelVersionStageResponse(model_version=version_pb(v))

    # -- aliases -----------------------------------------------------------------------------
    async def SetModelAlias(self, request: pb.SetModelAliasRequest, context) -> pb.SetModelAliasResponse:
        _resource("models", request.name, "aliases", request.alias)
        v, previous = await self._run(self.r.set_alias, request.name, request.alias, request.version, _principal())
        return pb.SetModelAliasResponse(model_version=version_pb(v), previous_version=previous)

    async def DeleteModelAlias(self, request: pb.DeleteModelAliasRequest, context) -> pb.DeleteModelAliasResponse:
        _resource("models", request.name, "aliases", request.alias)
        await self._run(self.r.delete_alias, request.name, request.alias)
        return pb.DeleteModelAliasResponse()

    async def GetModelVersionByAlias(self, request: pb.GetModelVersionByAliasRequest,
                                     context) -> pb.GetModelVersionByAliasResponse:
        v = await self._run(self.r.get_by_alias, request.name, request.alias)
        return pb.GetModelVersionByAliasResponse(model_version=version_pb(v))

    # -- artifacts ---------------------------------------------------------------------------
    async def BeginArtifactUpload(self, request: pb.BeginArtifactUploadRequest, context) -> pb.BeginArtifactUploadResponse:
        _resource("models", request.name, "versions", request.version, "artifact")
        up = await self._run(self.r.begin_upload, request.name, request.version, size_bytes=request.size_bytes,
                             sha256=request.sha256, filename=request.filename, principal=_principal())
        return pb.BeginArtifactUploadResponse(upload=upload_pb(up))

    async def AppendArtifactChunk(self, request: pb.AppendArtifactChunkRequest, context) -> pb.AppendArtifactChunkResponse:
        received = await self._run(self.r.append_chunk, request.upload_id, request.offset, request.data)
        return pb.AppendArtifactChunkResponse(received_bytes=received)

    async def GetArtifactUpload(self, request: pb.GetArtifactUploadRequest, context) -> pb.GetArtifactUploadResponse:
        return pb.GetArtifactUploadResponse(upload=upload_pb(await self._run(self.r.get_upload, request.upload_id)))

    async def CommitArtifactUpload(self, request: pb.CommitArtifactUploadRequest,
                                   context) -> pb.CommitArtifactUploadResponse:
        _resource("uploads", request.upload_id)
        v = await self._run(self.r.commit_upload, request.upload_id)
        _resource("models", v.name, "versions", v.version, "artifact")
        return pb.CommitArtifactUploadResponse(model_version=version_pb(v))

    async def AbortArtifactUpload(self, request: pb.AbortArtifactUploadRequest, context) -> pb.AbortArtifactUploadResponse:
        _resource("uploads", request.upload_id)
        await self._run(self.r.abort_upload, request.upload_id)
        return pb.AbortArtifactUploadResponse()

    async def DownloadArtifact(self, request: pb.DownloadArtifactRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[httpbody_pb2.HttpBody]:
        v, chunks = await self._run(self.r.read_artifact, request.name, request.version, _DOWNLOAD_CHUNK)
        # Over REST the transcoder turns these into headers of the raw-bytes response.
        await context.send_initial_metadata((("x-strata-sha256", v.sha256),
                                             ("x-strata-size-bytes", str(v.size_bytes))))
        content_type = "application/octet-stream"
        end = object()
        while True:
            chunk = await asyncio.to_thread(next, chunks, end)
            if chunk is end:
                break
            yield httpbody_pb2.HttpBody(content_type=content_type, data=chunk)  # type: ignore[arg-type]

    # -- promotions --------------------------------------------------------------------------
    async def RequestPromotion(self, request: pb.RequestPromotionRequest, context) -> pb.RequestPromotionResponse:
        _resource("models", request.name, "versions", request.version)
        p = await self._run(self.r.request_promotion, request.name, request.version, request.alias,
                            request.reason, _principal(), request.request_id)
        _resource("promotions", p.promotion_id)
        return pb.RequestPromotionResponse(promotion=promotion_pb(p))

    async def ApprovePromotion(self, request: pb.ApprovePromotionRequest, context) -> pb.ApprovePromotionResponse:
        _resource("promotions", request.promotion_id)
        p, v = await self._run(self.r.decide_promotion, request.promotion_id, _principal(), True, request.comment)
        return pb.ApprovePromotionResponse(promotion=promotion_pb(p), model_version=version_pb(v) if v else None)

    async def RejectPromotion(self, request: pb.RejectPromotionRequest, context) -> pb.RejectPromotionResponse:
        _resource("promotions", request.promotion_id)
        p, _ = await self._run(self.r.decide_promotion, request.promotion_id, _principal(), False, request.comment)
        return pb.RejectPromotionResponse(promotion=promotion_pb(p))

    async def ListPromotions(self, request: pb.ListPromotionsRequest, context) -> pb.ListPromotionsResponse:
        ps, token = await self._run(self.r.list_promotions, name=request.name, state=request.state,
                                    size=request.page_size, token=request.page_token)
        return pb.ListPromotionsResponse(promotions=[promotion_pb(p) for p in ps], next_page_token=token)

    async def GetModelCard(self, request: pb.GetModelCardRequest, context) -> httpbody_pb2.HttpBody:
        def build() -> str:
            model = self.r.get_model(request.name)
            version = self.r.get_version(request.name, request.version)
            promotions, _ = self.r.list_promotions(name=request.name, size=MAX_PAGE_SIZE)
            return render_model_card(model, version, [p for p in promotions if p.version == request.version])
        markdown = await self._run(build)
        return httpbody_pb2.HttpBody(content_type="text/markdown; charset=utf-8", data=markdown.encode())

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context) -> pb.ListAuditEventsResponse:
        check_filter(request.resource_prefix, "resource_prefix")
        check_filter(request.principal, "principal")
        page = PageRequest.parse("ListAuditEvents", request.page_size, request.page_token,
                                 {"resource_prefix": request.resource_prefix, "principal": request.principal},
                                 key=int)
        records, next_token = page.cut(await self._run(
            self.audit.list, resource_prefix=request.resource_prefix, principal=request.principal,
            before_id=page.after, limit=page.limit), lambda r: r.id)
        events = [types_pb2.AuditEvent(id=r.id, principal=r.principal, method=r.method, resource=r.resource,
                                       request_id=r.request_id, time=timestamp_pb(r.time), outcome=r.outcome,
                                       message=r.message) for r in records]
        return pb.ListAuditEventsResponse(
            audit_events=events, next_page_token=next_token)
