"""The KServe V2 / Open Inference Protocol service `inference.GRPCInferenceService`, as
tritonclient and perf_analyzer speak it: servicer and converters (its access rules are in
services/common/kserve_access.py). The data plane (dataplane.py) decides; this module translates.

Kept apart from the rest of the service because its generated module registers the protocol's
proto symbols (inference.DataType, ...), exactly as tritonclient's own generated module does:
only the server process imports this module, so a test or tool can use tritonclient and the
other Strata modules in one process.
"""

from __future__ import annotations

import numpy as np
from strata.kserve.v2 import grpc_service_pb2 as v2
from strata.kserve.v2 import grpc_service_pb2_grpc as v2_grpc
from strata.kserve.v2 import model_config_pb2 as mc

from services.common.errors import InvalidArgument
from services.common.limits import check_version
from services.common.telemetry import request_id_var
from services.inference.batching import BatchingConfig
from services.inference.dataplane import DataPlane, InferRequest, ModelStatistics, parse_version
from services.inference.model_store import LoadedModel, ModelState, ModelStatus
from services.inference.routing import Result
from services.inference.runtime import NUMPY_TO_V2, TensorInfo
from services.inference.tensors import InputTensor, serialize_bytes

SERVER_NAME = "strata"
SERVER_VERSION = "0.1.0"


# V2 typed contents field per datatype.
_V2_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


# -- converters -----------------------------------------------------------------------------------
def infer_request(req: v2.ModelInferRequest) -> InferRequest:
    """The plain request: each input's raw contents or typed contents by reference."""
    raw = req.raw_input_contents
    n = len(raw)
    inputs = []
    for i, t in enumerate(req.inputs):
        if n:
            # (a count that does not match is refused by the data plane, after routing)
            inputs.append(InputTensor(t.name, t.datatype, t.shape, raw[i] if i < n else b"",
                                      conflict="contents" if t.HasField("contents") else ""))
        else:
            attr = _V2_CONTENTS.get(t.datatype)
            inputs.append(InputTensor(t.name, t.datatype, t.shape, None,
                                      getattr(t.contents, attr) if attr else None))
    params = req.parameters
    return InferRequest(req.model_name, req.model_version, inputs, n,
                        params["routing_key"].string_param if "routing_key" in params else "",
                        [o.name for o in req.outputs] if req.outputs else (), req.id or request_id_var.get())


def infer_response(req: v2.ModelInferRequest, result: Result) -> v2.ModelInferResponse:
    resp = v2.ModelInferResponse(model_name=req.model_name, model_version=str(result.ref.version), id=req.id)
    if result.revision:
        resp.parameters["strata_model"].string_param = result.ref.model
        resp.parameters["policy_revision"].int64_param = result.revision
    for name, arr in result.outputs:
        o = resp.outputs.add()
        o.name = name
        o.datatype = NUMPY_TO_V2.get(arr.dtype, "BYTES")
        o.shape.extend(arr.shape)
        resp.raw_output_contents.append(serialize_bytes(arr) if arr.dtype == np.dtype(object)
                                        else np.ascontiguousarray(arr).tobytes())
    return resp


def v2_tensor_metadata(info: TensorInfo) -> v2.ModelMetadataResponse.TensorMetadata:
    return v2.ModelMetadataResponse.TensorMetadata(name=info.name, datatype=info.v2_datatype, shape=list(info.shape))


_CONFIG_TYPES = {"BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32,
                 "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8, "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32,
                 "INT64": mc.TYPE_INT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
                 "BYTES": mc.TYPE_STRING}


def model_config(name: str, m: LoadedModel, b: BatchingConfig) -> mc.ModelConfig:
    rt = m.runtime
    batched = rt.max_batch_size > 0

    def dims(i: TensorInfo) -> list[int]:
        return list(i.shape[1:] if batched else i.shape)
    cfg = mc.ModelConfig(
        name=name, platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=rt.max_batch_size,
        input=[mc.ModelInput(name=i.name, data_type=_CONFIG_TYPES[i.v2_datatype], dims=dims(i)) for i in rt.inputs],
        output=[mc.ModelOutput(name=o.name, data_type=_CONFIG_TYPES[o.v2_datatype], dims=dims(o))
                for o in rt.outputs],
        instance_group=[mc.ModelInstanceGroup(
            count=1, kind=mc.ModelInstanceGroup.KIND_GPU if rt.provider.startswith("CUDA")
            else mc.ModelInstanceGroup.KIND_CPU)])
    if batched:
        cfg.dynamic_batching.max_queue_delay_microseconds = b.max_queue_delay_us
        cfg.dynamic_batching.default_queue_policy.max_queue_size = b.max_queue_size
    return cfg


def model_statistics_pb(s: ModelStatistics) -> v2.ModelStatistics:
    st = v2.ModelStatistics(name=s.model, version=str(s.version), inference_count=s.inference_count,
                            execution_count=s.execution_count, last_inference=s.last_inference_ms)
    if not s.batchers:  # never run: no inference_stats at all
        return st
    st.inference_stats.queue.count = s.inference_count
    st.inference_stats.queue.ns = s.queue_ns
    st.inference_stats.compute_infer.count = s.execution_count
    st.inference_stats.compute_infer.ns = s.compute_ns
    return st


_INDEX_STATES = {ModelState.READY: "READY", ModelState.LOADING: "LOADING", ModelState.FAILED: "UNAVAILABLE"}


def model_index(s: ModelStatus) -> v2.RepositoryIndexResponse.ModelIndex:
    return v2.RepositoryIndexResponse.ModelIndex(name=s.model, version=str(s.version), state=_INDEX_STATES[s.state],
                                                 reason=s.reason)


def load_args(request: v2.RepositoryModelLoadRequest) -> tuple[str, int, str]:
    """Model name, version and alias of RepositoryModelLoad (its parameters "version", "alias")."""
    if not request.model_name:
        raise InvalidArgument("model_name", "model name is required")
    version, alias = 0, ""
    p = request.parameters
    if "version" in p:
        version = p["version"].int64_param or parse_version(p["version"].string_param or "0",
                                                            "parameters[version]", optional=True)
        check_version(version, "parameters[version]", optional=True)
    if "alias" in p:
        alias = p["alias"].string_param
    return request.model_name, version, alias


class V2Servicer(v2_grpc.GRPCInferenceServiceServicer):
    """The Open Inference Protocol. `model_name` names an endpoint (routed by its traffic policy)
    or a registered model loaded with RepositoryModelLoad (`model_version` picks the version;
    empty: the newest loaded one). Translation only; the data plane (dataplane.py) decides."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def ServerLive(self, request, context) -> v2.ServerLiveResponse:  # noqa: ANN001, N802
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> v2.ServerReadyResponse:  # noqa: ANN001, N802
        return v2.ServerReadyResponse(ready=self.plane.ready())

    async def ServerMetadata(self, request, context) -> v2.ServerMetadataResponse:  # noqa: ANN001, N802
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                         extensions=["model_repository", "statistics", "model_configuration"])

    async def ModelReady(self, request, context) -> v2.ModelReadyResponse:  # noqa: ANN001, N802
        return v2.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    async def ModelMetadata(self, request, context) -> v2.ModelMetadataResponse:  # noqa: ANN001, N802
        m = self.plane.model(request.name, request.version, "name")
        return v2.ModelMetadataResponse(
            name=request.name, versions=[str(v) for v in self.plane.model_versions(m.ref.model)],
            platform="onnxruntime_onnx",
            inputs=[v2_tensor_metadata(i) for i in m.runtime.inputs],
            outputs=[v2_tensor_metadata(o) for o in m.runtime.outputs])

    async def ModelConfig(self, request, context) -> v2.ModelConfigResponse:  # noqa: ANN001, N802
        m = self.plane.model(request.name, request.version, "name")
        return v2.ModelConfigResponse(config=model_config(request.name, m, self.plane.default_batching))

    async def ModelStatistics(self, request, context) -> v2.ModelStatisticsResponse:  # noqa: ANN001, N802
        stats = self.plane.model_statistics(request.name, request.version)
        return v2.ModelStatisticsResponse(model_stats=[model_statistics_pb(s) for s in stats])

    async def RepositoryIndex(self, request, context) -> v2.RepositoryIndexResponse:  # noqa: ANN001, N802
        return v2.RepositoryIndexResponse(models=[model_index(s) for s in self.plane.statuses()
                                                  if not request.ready or s.state is ModelState.READY])

    async def RepositoryModelLoad(self, request, context) -> v2.RepositoryModelLoadResponse:  # noqa: ANN001, N802
        name, version, alias = load_args(request)
        await self.plane.load_model(name, version, alias, field="model_name")
        return v2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context) -> v2.RepositoryModelUnloadResponse:  # noqa: ANN001, N802
        await self.plane.unload_all(request.model_name)
        return v2.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:  # noqa: ANN001, N802
        return infer_response(request, await self.plane.model_infer(infer_request(request)))
