"""gRPC servicers of the inference service: strata.inference.v1.InferenceService and the
KServe V2 / Open Inference Protocol `inference.GRPCInferenceService` (as tritonclient speaks it).
Translation between protos and the engine only; the work is in routing.py and models.py."""

from __future__ import annotations

import asyncio
from datetime import datetime

from google.protobuf import timestamp_pb2
from inference import grpc_service_pb2 as v2
from inference import grpc_service_pb2_grpc as v2_grpc
from inference import model_config_pb2 as mc
from strata.common.v1 import types_pb2
from strata.inference.v1 import inference_pb2 as pb
from strata.inference.v1 import inference_pb2_grpc

from services.common.audit import current_resource
from services.common.auth import current_principal
from services.common.errors import InvalidArgument, NotFound
from services.common.policy import MethodPolicy
from services.common.telemetry import request_id_var
from services.inference import codec
from services.inference.endpoints import EndpointRecord, validate_policy
from services.inference.models import LoadedModel, ModelRef
from services.inference.routing import Engine
from services.inference.runtime import ModelRuntime, TensorInfo

SERVER_NAME = "strata"
SERVER_VERSION = "0.1.0"

# The V2 protocol's methods carry no Strata access option (the proto is fixed by the protocol),
# so their rules are declared here: probes are public, reads need viewer, loads need developer.
_V2 = "/inference.GRPCInferenceService/"
_PUBLIC, _VIEWER, _DEVELOPER = 0, 1, 2
V2_POLICIES = {p.path: p for p in [
    MethodPolicy(_V2 + "ServerLive", _PUBLIC, False), MethodPolicy(_V2 + "ServerReady", _PUBLIC, False),
    MethodPolicy(_V2 + "ServerMetadata", _PUBLIC, False), MethodPolicy(_V2 + "ModelReady", _VIEWER, False),
    MethodPolicy(_V2 + "ModelMetadata", _VIEWER, False), MethodPolicy(_V2 + "ModelInfer", _VIEWER, False),
    MethodPolicy(_V2 + "ModelConfig", _VIEWER, False), MethodPolicy(_V2 + "ModelStatistics", _VIEWER, False),
    MethodPolicy(_V2 + "RepositoryIndex", _VIEWER, False),
    MethodPolicy(_V2 + "RepositoryModelLoad", _DEVELOPER, True),
    MethodPolicy(_V2 + "RepositoryModelUnload", _DEVELOPER, True),
]}


def _ts(t: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def endpoint_pb(e: EndpointRecord) -> pb.Endpoint:
    return pb.Endpoint(name=e.name, description=e.description, revision=e.revision, policy=e.policy,
                       created_by=e.created_by, create_time=_ts(e.create_time), update_time=_ts(e.update_time))


def _signature(rt: ModelRuntime) -> types_pb2.ModelSignature:
    def spec(i: TensorInfo) -> types_pb2.TensorSpec:
        return types_pb2.TensorSpec(name=i.name, dtype=codec.NUMPY_TO_STRATA.get(i.dtype, 0), shape=list(i.shape))
    return types_pb2.ModelSignature(inputs=[spec(i) for i in rt.inputs], outputs=[spec(o) for o in rt.outputs])


def loaded_pb(m: LoadedModel) -> pb.LoadedModel:
    return pb.LoadedModel(model=m.ref.model, version=m.ref.version, state="READY", provider=m.runtime.provider,
                          memory_bytes=m.runtime.memory_bytes, signature=_signature(m.runtime), sha256=m.sha256)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.endpoints = engine.endpoints

    async def _resolve_policy(self, policy: pb.TrafficPolicy, field: str) -> pb.TrafficPolicy:
        """Aliases and missing versions -> concrete versions, so every process routes alike."""
        resolved = pb.TrafficPolicy()
        resolved.CopyFrom(policy)
        for kind in ("targets", "shadows"):
            for i, tg in enumerate(getattr(resolved, kind)):
                if not tg.model:
                    raise InvalidArgument(f"{field}.{kind}[{i}].model", "model name is required")
                if tg.version < 0:
                    raise InvalidArgument(f"{field}.{kind}[{i}].version", "must be positive (or 0 with an alias)")
                if tg.version and tg.alias:
                    raise InvalidArgument(f"{field}.{kind}[{i}].alias", "give a version or an alias, not both")
                ref = await self.engine.store.resolve(tg.model, tg.version, tg.alias)
                tg.version = ref.version
        return resolved

    async def _preload(self, policy: pb.TrafficPolicy) -> None:
        for tg in (*policy.targets, *policy.shadows):
            await self.engine.store.load(ModelRef(tg.model, tg.version))

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:  # noqa: ANN001, N802
        rid = request.request_id or request_id_var.get()
        if request.inputs and request.rows:
            raise InvalidArgument("rows", "give inputs or rows, not both")
        if not request.inputs and not request.rows:
            raise InvalidArgument("inputs", "no inputs: give inputs (tensors) or rows")
        raw_used = False

        def decode(rt: ModelRuntime) -> dict:
            nonlocal raw_used
            specs = {i.name: i for i in rt.inputs}
            if request.rows:
                return codec.row_inputs(request.rows, specs)
            feeds, raw_used = codec.tensor_inputs(request.inputs, specs)
            return feeds

        result = await self.engine.predict(request.endpoint, decode, request.routing_key, rid)
        outputs = result.outputs
        if request.output_names:
            known = {n for n, _ in outputs}
            for i, n in enumerate(request.output_names):
                if n not in known:
                    raise InvalidArgument(f"output_names[{i}]", f"unknown output '{n}'; outputs are {sorted(known)}")
            outputs = [(n, a) for n, a in outputs if n in set(request.output_names)]
        resp = pb.PredictResponse(endpoint=request.endpoint, model=result.ref.model, version=result.ref.version,
                                  policy_revision=result.revision, request_id=rid)
        if request.rows:
            resp.rows.extend(codec.to_rows(outputs))
        else:
            to = codec.to_raw_tensor if raw_used else codec.to_value_tensor
            resp.outputs.extend(to(n, a) for n, a in outputs)
        return resp

    async def CreateEndpoint(self, request: pb.CreateEndpointRequest, context) -> pb.CreateEndpointResponse:  # noqa: ANN001, N802
        e = request.endpoint
        current_resource.set(f"endpoints/{e.name}")
        if not e.name:
            raise InvalidArgument("endpoint.name", "endpoint name is required")
        validate_policy(e.policy, "endpoint.policy")
        policy = await self._resolve_policy(e.policy, "endpoint.policy")
        await self._preload(policy)
        rec = await asyncio.to_thread(self.endpoints.create, e.name, e.description, policy,
                                      current_principal.get().subject, request.request_id)
        await self.engine.publish(rec.name, rec.revision)
        return pb.CreateEndpointResponse(endpoint=endpoint_pb(rec))

    async def GetEndpoint(self, request: pb.GetEndpointRequest, context) -> pb.GetEndpointResponse:  # noqa: ANN001, N802
        rec = await asyncio.to_thread(self.endpoints.get, request.name)
        return pb.GetEndpointResponse(endpoint=endpoint_pb(rec))

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context) -> pb.ListEndpointsResponse:  # noqa: ANN001, N802
        if not 0 <= request.page_size <= 500:
            raise InvalidArgument("page_size", "must be within 0..500")
        size = request.page_size or 50
        recs = await asyncio.to_thread(self.endpoints.list, size + 1, request.page_token)
        more = len(recs) > size
        recs = recs[:size]
        return pb.ListEndpointsResponse(endpoints=[endpoint_pb(r) for r in recs],
                                        next_page_token=recs[-1].name if more else "")

    async def DeleteEndpoint(self, request: pb.DeleteEndpointRequest, context) -> pb.DeleteEndpointResponse:  # noqa: ANN001, N802
        current_resource.set(f"endpoints/{request.name}")
        await asyncio.to_thread(self.endpoints.delete, request.name)
        await self.engine.sync()
        return pb.DeleteEndpointResponse()

    async def SetTrafficPolicy(self, request: pb.SetTrafficPolicyRequest, context) -> pb.SetTrafficPolicyResponse:  # noqa: ANN001, N802
        current_resource.set(f"endpoints/{request.endpoint}")
        await asyncio.to_thread(self.endpoints.get, request.endpoint)  # NOT_FOUND before any loading
        validate_policy(request.policy)
        policy = await self._resolve_policy(request.policy, "policy")
        await self._preload(policy)  # blue/green: the new versions are warm before the switch
        rec = await asyncio.to_thread(self.endpoints.set_policy, request.endpoint, policy,
                                      current_principal.get().subject, expected_revision=request.expected_revision,
                                      reason=request.reason)
        await self.engine.publish(rec.name, rec.revision)
        return pb.SetTrafficPolicyResponse(endpoint=endpoint_pb(rec))

    async def RollbackTrafficPolicy(self, request: pb.RollbackTrafficPolicyRequest, context) -> pb.RollbackTrafficPolicyResponse:  # noqa: ANN001, N802, E501
        current_resource.set(f"endpoints/{request.endpoint}")
        rec = await asyncio.to_thread(self.endpoints.rollback, request.endpoint, current_principal.get().subject,
                                      expected_revision=request.expected_revision)
        await self.engine.publish(rec.name, rec.revision)
        return pb.RollbackTrafficPolicyResponse(endpoint=endpoint_pb(rec))

    async def ListPolicyRevisions(self, request: pb.ListPolicyRevisionsRequest, context) -> pb.ListPolicyRevisionsResponse:  # noqa: ANN001, N802, E501
        if not 0 <= request.page_size <= 500:
            raise InvalidArgument("page_size", "must be within 0..500")
        revs = await asyncio.to_thread(self.endpoints.revisions, request.endpoint, request.page_size or 50)
        return pb.ListPolicyRevisionsResponse(revisions=[
            pb.PolicyRevision(revision=r.revision, policy=r.policy, created_by=r.created_by,
                              create_time=_ts(r.create_time), reason=r.reason) for r in revs])

    async def GetEndpointStats(self, request: pb.GetEndpointStatsRequest, context) -> pb.GetEndpointStatsResponse:  # noqa: ANN001, N802
        rec = await asyncio.to_thread(self.endpoints.get, request.endpoint)
        await self.engine.report()
        stats = await asyncio.to_thread(self.engine.endpoint_stats, rec.name, rec.revision)
        return pb.GetEndpointStatsResponse(revision=rec.revision, targets=stats)

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:  # noqa: ANN001, N802
        if not request.model:
            raise InvalidArgument("model", "model name is required")
        ref = await self.engine.store.resolve(request.model, request.version, request.alias)
        current_resource.set(f"models/{ref.model}/versions/{ref.version}")
        return pb.LoadModelResponse(model=loaded_pb(await self.engine.store.load(ref)))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:  # noqa: ANN001, N802
        current_resource.set(f"models/{request.model}/versions/{request.version}")
        if not await self.engine.store.unload(ModelRef(request.model, request.version)):
            raise NotFound(f"models/{request.model}/versions/{request.version} is not loaded")
        return pb.UnloadModelResponse()

    async def ListLoadedModels(self, request: pb.ListLoadedModelsRequest, context) -> pb.ListLoadedModelsResponse:  # noqa: ANN001, N802
        models = [loaded_pb(m) for m in self.engine.store.loaded()]
        models += [pb.LoadedModel(model=r.model, version=r.version, state="LOADING")
                   for r in self.engine.store.loading()]
        models += [pb.LoadedModel(model=r.model, version=r.version, state="FAILED", reason=why)
                   for r, why in self.engine.store.failures.items()]
        return pb.ListLoadedModelsResponse(models=models)


_CONFIG_TYPES = {"BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32,
                 "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8, "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32,
                 "INT64": mc.TYPE_INT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
                 "BYTES": mc.TYPE_STRING}


class V2Servicer(v2_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol. `model_name` names an endpoint (routed by its traffic policy)
    or a registered model loaded with RepositoryModelLoad (`model_version` picks the version;
    empty: the newest loaded one)."""

    def __init__(self, engine: Engine, ready: "asyncio.Event") -> None:
        self.engine = engine
        self._ready = ready

    def _model(self, name: str, version: str, field: str = "model_name") -> LoadedModel:
        if not name:
            raise InvalidArgument(field, "model name is required")
        route = self.engine.routes.get(name)
        if route is not None and not version:
            m = self.engine.store.get(route.targets[0])
            if m is not None:
                return m
        if version:
            try:
                ref = ModelRef(name, int(version))
            except ValueError:
                raise InvalidArgument("model_version", f"'{version}' is not a version number") from None
            m = self.engine.store.get(ref)
            if m is None:
                raise NotFound(f"model '{name}' version {version} is not loaded")
            return m
        versions = self.engine.store.versions_of(name)
        if not versions:
            raise NotFound(f"model '{name}' is not loaded (load it with RepositoryModelLoad, or deploy an endpoint)")
        return self.engine.store.get(ModelRef(name, versions[-1]))  # type: ignore[return-value]

    async def ServerLive(self, request, context) -> v2.ServerLiveResponse:  # noqa: ANN001, N802
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> v2.ServerReadyResponse:  # noqa: ANN001, N802
        return v2.ServerReadyResponse(ready=self._ready.is_set() and not self.engine.failures)

    async def ServerMetadata(self, request, context) -> v2.ServerMetadataResponse:  # noqa: ANN001, N802
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=["model_repository", "statistics", "model_configuration"])

    async def ModelReady(self, request, context) -> v2.ModelReadyResponse:  # noqa: ANN001, N802
        try:
            self._model(request.name, request.version, "name")
        except NotFound:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context) -> v2.ModelMetadataResponse:  # noqa: ANN001, N802
        m = self._model(request.name, request.version, "name")
        return v2.ModelMetadataResponse(
            name=request.name, versions=[str(v) for v in self.engine.store.versions_of(m.ref.model)],
            platform="onnxruntime_onnx",
            inputs=[codec.v2_tensor_metadata(i) for i in m.runtime.inputs],
            outputs=[codec.v2_tensor_metadata(o) for o in m.runtime.outputs])

    async def ModelConfig(self, request, context) -> v2.ModelConfigResponse:  # noqa: ANN001, N802
        m = self._model(request.name, request.version, "name")
        rt = m.runtime
        batched = rt.max_batch_size > 0

        def dims(i: TensorInfo) -> list[int]:
            return list(i.shape[1:] if batched else i.shape)
        b = self.engine.default_batching
        cfg = mc.ModelConfig(
            name=request.name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=rt.max_batch_size,
            input=[mc.ModelInput(name=i.name, data_type=_CONFIG_TYPES[i.v2_datatype], dims=dims(i)) for i in rt.inputs],
            output=[mc.ModelOutput(name=o.name, data_type=_CONFIG_TYPES[o.v2_datatype], dims=dims(o))
                    for o in rt.outputs],
            instance_group=[mc.ModelInstanceGroup(
                count=1, kind=mc.ModelInstanceGroup.KIND_GPU if rt.provider.startswith("CUDA")
                else mc.ModelInstanceGroup.KIND_CPU)])
        if batched:
            cfg.dynamic_batching.max_queue_delay_microseconds = b.max_queue_delay_us
            cfg.dynamic_batching.default_queue_policy.max_queue_size = b.max_queue_size
        return v2.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request, context) -> v2.ModelStatisticsResponse:  # noqa: ANN001, N802
        models = [self._model(request.name, request.version, "name")] if request.name else self.engine.store.loaded()
        out = []
        for m in models:
            st = v2.ModelStatistics(name=m.ref.model, version=str(m.ref.version))
            for b in m.batchers.values():
                s = b.stats
                st.inference_count += s.inference_count
                st.execution_count += s.execution_count
                st.last_inference = max(st.last_inference, s.last_inference_ms)
                st.inference_stats.queue.count += s.inference_count
                st.inference_stats.queue.ns += s.queue_ns
                st.inference_stats.compute_infer.count += s.execution_count
                st.inference_stats.compute_infer.ns += s.compute_ns
            out.append(st)
        return v2.ModelStatisticsResponse(model_stats=out)

    async def RepositoryIndex(self, request, context) -> v2.RepositoryIndexResponse:  # noqa: ANN001, N802
        idx = [v2.RepositoryIndexResponse.ModelIndex(name=m.ref.model, version=str(m.ref.version), state="READY")
               for m in self.engine.store.loaded()]
        if not request.ready:
            idx += [v2.RepositoryIndexResponse.ModelIndex(name=r.model, version=str(r.version), state="LOADING")
                    for r in self.engine.store.loading()]
            idx += [v2.RepositoryIndexResponse.ModelIndex(name=r.model, version=str(r.version), state="UNAVAILABLE",
                                                          reason=why) for r, why in self.engine.store.failures.items()]
        return v2.RepositoryIndexResponse(models=idx)

    async def RepositoryModelLoad(self, request, context) -> v2.RepositoryModelLoadResponse:  # noqa: ANN001, N802
        if not request.model_name:
            raise InvalidArgument("model_name", "model name is required")
        version, alias = 0, ""
        p = request.parameters
        if "version" in p:
            version = p["version"].int64_param or int(p["version"].string_param or 0)
        if "alias" in p:
            alias = p["alias"].string_param
        ref = await self.engine.store.resolve(request.model_name, version, alias)
        current_resource.set(f"models/{ref.model}/versions/{ref.version}")
        await self.engine.store.load(ref)
        return v2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context) -> v2.RepositoryModelUnloadResponse:  # noqa: ANN001, N802
        versions = self.engine.store.versions_of(request.model_name)
        if not versions:
            raise NotFound(f"model '{request.model_name}' is not loaded")
        current_resource.set(f"models/{request.model_name}")
        for v in versions:
            await self.engine.store.unload(ModelRef(request.model_name, v))
        return v2.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:  # noqa: ANN001, N802
        rid = request.id or request_id_var.get()
        if not request.model_name:
            raise InvalidArgument("model_name", "model name is required")
        if request.model_name in self.engine.routes and not request.model_version:
            key = request.parameters["routing_key"].string_param if "routing_key" in request.parameters else ""
            result = await self.engine.predict(request.model_name, lambda _rt: codec.v2_inputs(request), key, rid)
        else:
            m = self._model(request.model_name, request.model_version)
            result = await self.engine.infer_model(m, codec.v2_inputs(request), rid)
        outputs = result.outputs
        if request.outputs:
            wanted = [o.name for o in request.outputs]
            known = dict(outputs)
            for n in wanted:
                if n not in known:
                    raise InvalidArgument(f"outputs[{n}]", f"unknown output '{n}'; outputs are {sorted(known)}")
            outputs = [(n, known[n]) for n in wanted]
        resp = v2.ModelInferResponse(model_name=request.model_name, model_version=str(result.ref.version), id=request.id)
        if result.revision:
            resp.parameters["strata_model"].string_param = result.ref.model
            resp.parameters["policy_revision"].int64_param = result.revision
        codec.v2_response(resp, outputs)
        return resp
