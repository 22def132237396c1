"""The KServe V2 / Open Inference Protocol service `inference.GRPCInferenceService`, as
tritonclient and perf_analyzer speak it: servicer and tensor codec (its access
rules are in services/common/kserve_access.py).

Kept apart from the rest of the service because its generated module registers the protocol's
proto symbols (inference.DataType, ...), exactly as tritonclient's own generated module does:
only the server process imports this module, so a test or tool can use tritonclient and the
other Strata modules in one process.
"""

from __future__ import annotations

import asyncio

import numpy as np
from strata.kserve.v2 import grpc_service_pb2 as v2
from strata.kserve.v2 import grpc_service_pb2_grpc as v2_grpc
from strata.kserve.v2 import model_config_pb2 as mc

from services.common.audit import current_resource
from services.common.errors import InvalidArgument, NotFound, quote
from services.common.limits import check_version
from services.common.telemetry import request_id_var
from services.inference.codec import count, from_raw, reshape, serialize_bytes, shape_of
from services.inference.model_store import LoadedModel, ModelRef
from services.inference.routing import Engine
from services.inference.runtime import NUMPY_TO_V2, V2_TO_NUMPY, TensorInfo

SERVER_NAME = "strata"
SERVER_VERSION = "0.1.0"



# V2 typed contents field per datatype.
_V2_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


# -- codec ----------------------------------------------------------------------------------------
def v2_inputs(req: v2.ModelInferRequest) -> dict[str, np.ndarray]:
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise InvalidArgument("raw_input_contents", f"{len(raw)} raw contents for {len(req.inputs)} inputs; "
                              "give one per input, in the order of 'inputs'")
    feeds: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        field = f"inputs[{quote(t.name, bare=True)}]"
        dtype = V2_TO_NUMPY.get(t.datatype)
        if dtype is None:
            raise InvalidArgument(field, f"input {quote(t.name)}: unknown datatype {quote(t.datatype)}")
        if t.name in feeds:
            raise InvalidArgument(field, f"input {quote(t.name)} is given twice")
        shape = shape_of(field, t.shape)
        if raw:
            if t.HasField("contents"):
                raise InvalidArgument(field, f"input {quote(t.name)}: contents and raw_input_contents are both set")
            feeds[t.name] = from_raw(field, t.name, raw[i], dtype, shape)
            continue
        attr = _V2_CONTENTS.get(t.datatype)
        if attr is None:
            raise InvalidArgument(field, f"input {quote(t.name)}: {t.datatype} travels only in raw_input_contents")
        values = getattr(t.contents, attr)
        if len(values) != count(shape):
            raise InvalidArgument(field, f"input {quote(t.name)}: {len(values)} values, shape "
                                  f"{quote(list(shape))} needs {count(shape)}")
        if dtype == np.dtype(object):
            arr = np.array([v.decode("utf-8", "replace") for v in values], dtype=object)
        else:
            arr = np.array(values, dtype=dtype)
        feeds[t.name] = reshape(field, t.name, arr, shape)
    return feeds


def _version_number(text: str, field: str, *, optional: bool = False) -> int:
    """A V2 version string ("3") as a version number (1..MAX_VERSION; "0" too when optional)."""
    try:
        number = int(text)
    except ValueError:
        raise InvalidArgument(field, f"{quote(text)} is not a version number") from None
    return check_version(number, field, optional=optional)


def v2_response(resp: v2.ModelInferResponse, outputs: list[tuple[str, np.ndarray]]) -> None:
    for name, arr in outputs:
        o = resp.outputs.add()
        o.name = name
        o.datatype = NUMPY_TO_V2.get(arr.dtype, "BYTES")
        o.shape.extend(arr.shape)
        resp.raw_output_contents.append(serialize_bytes(arr) if arr.dtype == np.dtype(object)
                                        else np.ascontiguousarray(arr).tobytes())


def v2_tensor_metadata(info: TensorInfo) -> v2.ModelMetadataResponse.TensorMetadata:
    return v2.ModelMetadataResponse.TensorMetadata(name=info.name, datatype=info.v2_datatype, shape=list(info.shape))



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
            version_field = "version" if field == "name" else "model_version"
            ref = ModelRef(name, _version_number(version, version_field))
            m = self.engine.store.get(ref)
            if m is None:
                raise NotFound(f"model {quote(name)} version {ref.version} is not loaded")
            return m
        versions = self.engine.store.versions_of(name)
        if not versions:
            raise NotFound(f"model {quote(name)} is not loaded (load it with RepositoryModelLoad, or deploy an "
                           "endpoint)")
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
            inputs=[v2_tensor_metadata(i) for i in m.runtime.inputs],
            outputs=[v2_tensor_metadata(o) for o in m.runtime.outputs])

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
            version = p["version"].int64_param or _version_number(p["version"].string_param or "0",
                                                                  "parameters[version]", optional=True)
            check_version(version, "parameters[version]", optional=True)
        if "alias" in p:
            alias = p["alias"].string_param
        ref = await self.engine.store.resolve(request.model_name, version, alias)
        current_resource.set(f"models/{ref.model}/versions/{ref.version}")
        await self.engine.store.load(ref)
        return v2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context) -> v2.RepositoryModelUnloadResponse:  # noqa: ANN001, N802
        versions = self.engine.store.versions_of(request.model_name)
        if not versions:
            raise NotFound(f"model {quote(request.model_name)} is not loaded")
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
            result = await self.engine.predict(request.model_name, lambda _rt: v2_inputs(request), key, rid)
        else:
            m = self._model(request.model_name, request.model_version)
            result = await self.engine.infer_model(m, v2_inputs(request), rid)
        outputs = result.outputs
        if request.outputs:
            wanted = [o.name for o in request.outputs]
            known = dict(outputs)
            for n in wanted:
                if n not in known:
                    raise InvalidArgument(f"outputs[{quote(n, bare=True)}]", f"unknown output {quote(n)}; outputs "
                                          f"are {sorted(known)}")
            outputs = [(n, known[n]) for n in wanted]
        resp = v2.ModelInferResponse(model_name=request.model_name, model_version=str(result.ref.version), id=request.id)
        if result.revision:
            resp.parameters["strata_model"].string_param = result.ref.model
            resp.parameters["policy_revision"].int64_param = result.revision
        v2_response(resp, outputs)
        return resp
