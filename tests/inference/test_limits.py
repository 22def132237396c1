"""Out-of-range and oversized input to the inference service, over gRPC: versions beyond the
registry's int32 (and negative ones) are INVALID_ARGUMENT naming the field, errors quote input
short, NaN and infinities in inputs are refused unless the model's signature allows them, and
non-finite outputs reach JSON clients the way proto3 JSON writes them ("NaN", "Infinity")."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from strata.inference.v1 import inference_pb2 as pb

from services.clients.registry import RegistryClient
from tests.inference import models
from tests.inference.conftest import Inference, Registry, policy

MIB = 1 << 20
X = np.array([[0.0, -1.0, 1.0, 2.0]], np.float32)  # log: -inf, NaN, 0, 0.69


@pytest.fixture(scope="module")
def stub(inference: Inference, registry: Registry, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Endpoints: "lim" (mlp 3), "logs" (y = log(x), version 1: NaN inputs refused, the default)
    and "lognan" (the same model as version 2, registered with allow_nan)."""
    path = tmp_path_factory.mktemp("log") / "log.onnx"
    path.write_bytes(models.log())
    with RegistryClient(registry.addr) as c:
        assert c.register_onnx("logfn", path, create_model=True).signature.allow_nan is False
        assert c.register_onnx("logfn", path, allow_nan=True).signature.allow_nan is True
    s = inference.stub()
    for name, pol in (("lim", policy(("mlp", 3, 1))), ("logs", policy(("logfn", 1, 1))),
                      ("lognan", policy(("logfn", 2, 1)))):
        s.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(name=name, policy=pol)))
    return s


def _fails(call, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, (err.value.code(), err.value.details())
    return err.value.details()


# -- versions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [-1, 2**31, 2**63 - 1])
def test_model_versions_out_of_range_name_the_field(stub, version: int) -> None:  # noqa: ANN001
    # Before: 2^31 and up reached the registry's int32 field (INTERNAL); -1 came back from the
    # registry as FAILED_PRECONDITION.
    assert _fails(lambda: stub.LoadModel(pb.LoadModelRequest(model="mlp", version=version))).startswith("version: ")
    assert _fails(lambda: stub.UnloadModel(pb.UnloadModelRequest(model="mlp", version=version))).startswith(
        "version: ")
    bad = pb.TrafficPolicy(targets=[pb.Target(model="mlp", version=3, weight=1)],
                           shadows=[pb.Target(model="mlp", version=version)])
    assert _fails(lambda: stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="lim", policy=bad))).startswith(
        "policy.shadows[0].version: ")
    assert _fails(lambda: stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(
        name="never", policy=policy(("mlp", version, 1)))))).startswith("endpoint.policy.targets[0].version: ")
    assert _fails(lambda: stub.CreateBatchJob(pb.CreateBatchJobRequest(job=pb.BatchJob(
        model="mlp", version=version, input_uri="in.parquet", output_uri="out.parquet")))).startswith("job.version: ")
    assert stub.GetEndpoint(pb.GetEndpointRequest(name="lim")).endpoint.revision == 1  # nothing changed


def test_v2_model_versions_out_of_range_name_the_parameter(inference: Inference) -> None:
    # tritonclient's stubs: Strata's own V2 module may not share a process with tritonclient's.
    from tritonclient.grpc import service_pb2 as v2
    from tritonclient.grpc import service_pb2_grpc as v2_grpc
    v2_stub = v2_grpc.GRPCInferenceServiceStub(inference.channel())
    for value in ("abc", str(2**31), "-3"):
        details = _fails(lambda: v2_stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(
            model_name="mlp", parameters={"version": v2.ModelRepositoryParameter(string_param=value)})))
        assert details.startswith("parameters[version]: "), details
    details = _fails(lambda: v2_stub.ModelReady(v2.ModelReadyRequest(name="mlp", version=str(2**40))))
    assert details.startswith("version: "), details


# -- huge input ----------------------------------------------------------------------------------
def _row(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@pytest.mark.parametrize("call", [
    lambda s: s.Predict(pb.PredictRequest(endpoint="e" * MIB, inputs=[pb.Tensor(name="input", shape=[1, 32],
                                                                                raw=bytes(128))])),
    lambda s: s.Predict(pb.PredictRequest(endpoint="lim", inputs=[pb.Tensor(name="i" * MIB, shape=[1, 32],
                                                                           raw=bytes(128))])),
    lambda s: s.Predict(pb.PredictRequest(endpoint="lim", rows=[_row(**{"input": [1.0] * 32, "k" * MIB: 1.0})])),
    lambda s: s.Predict(pb.PredictRequest(endpoint="lim", inputs=[pb.Tensor(name="input", shape=[1, 32],
                                                                           raw=bytes(128))],
                                          output_names=["o" * MIB])),
    lambda s: s.GetEndpoint(pb.GetEndpointRequest(name="e" * MIB)),
    lambda s: s.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(name="e" * MIB,
                                                                             policy=policy(("mlp", 3, 1))))),
    lambda s: s.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="e" * MIB, policy=policy(("mlp", 3, 1)))),
    lambda s: s.DeleteEndpoint(pb.DeleteEndpointRequest(name="e" * MIB)),
    lambda s: s.LoadModel(pb.LoadModelRequest(model="m" * MIB, version=1)),
    lambda s: s.LoadModel(pb.LoadModelRequest(model="mlp", alias="a" * MIB)),
    lambda s: s.UnloadModel(pb.UnloadModelRequest(model="m" * MIB, version=1)),
    lambda s: s.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="lim", policy=policy(("m" * MIB, 1, 1)))),
], ids=["endpoint", "input-name", "row-key", "output-name", "get", "create", "set-policy", "delete", "load",
        "load-alias", "unload", "policy-model"])
def test_huge_input_is_quoted_short_in_the_error(stub, call) -> None:  # noqa: ANN001
    # Echoed whole, a 1 MiB name made the status too large to send: RESOURCE_EXHAUSTED here,
    # a 502 through the gateway.
    with pytest.raises(grpc.RpcError) as err:
        call(stub)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), err.value.details()
    assert len(err.value.details()) < 1024 and f"({MIB}" in err.value.details(), err.value.details()


# -- NaN and infinities --------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_are_refused_unless_the_signature_allows_them(stub, bad: float) -> None:  # noqa: ANN001
    x = X.copy()
    x[0, 2] = bad
    raw = pb.Tensor(name="x", shape=[1, 4], raw=x.tobytes())
    values = pb.Tensor(name="x", shape=[1, 4], float_values=x.reshape(-1).tolist())
    for request in (pb.PredictRequest(endpoint="logs", inputs=[raw]), pb.PredictRequest(endpoint="logs",
                                                                                         inputs=[values])):
        details = _fails(lambda: stub.Predict(request))  # noqa: B023
        assert details.startswith("inputs[x]: input 'x'") and "allow_nan" in details, details
    # Allowed by the signature: scored, and the output says what the model made of it.
    out = stub.Predict(pb.PredictRequest(endpoint="lognan", inputs=[raw])).outputs[0]
    y = np.frombuffer(out.raw, np.float32)
    assert (np.isnan(y[2]) if bad != math.inf else y[2] == math.inf), y


def test_a_null_in_a_row_is_a_nan_input(stub) -> None:  # noqa: ANN001
    row = _row(x=[1.0, None, 1.0, 1.0])
    assert "allow_nan" in _fails(lambda: stub.Predict(pb.PredictRequest(endpoint="logs", rows=[row])))
    out = stub.Predict(pb.PredictRequest(endpoint="lognan", rows=[row])).rows[0].fields["y"].list_value.values
    assert out[1].string_value == "NaN"


def test_loaded_models_report_whether_their_signature_allows_nan(stub) -> None:  # noqa: ANN001
    assert stub.LoadModel(pb.LoadModelRequest(model="logfn", version=1)).model.signature.allow_nan is False
    assert stub.LoadModel(pb.LoadModelRequest(model="logfn", version=2)).model.signature.allow_nan is True


def test_non_finite_outputs_in_rows_are_written_as_proto3_json_writes_them(stub) -> None:  # noqa: ANN001
    # google.protobuf.Value has no NaN or infinity in JSON: the gateway's transcoder refused such
    # a response (a 502). Rows carry them as the strings proto3 JSON uses for double fields.
    r = stub.Predict(pb.PredictRequest(endpoint="logs", rows=[_row(x=X[0].tolist())]))
    y = r.rows[0].fields["y"].list_value.values
    assert [v.WhichOneof("kind") for v in y] == ["string_value", "string_value", "number_value", "number_value"]
    assert (y[0].string_value, y[1].string_value, y[2].number_value) == ("-Infinity", "NaN", 0.0)
    assert y[3].number_value == pytest.approx(math.log(2))
    # Tensors keep them as numbers (double fields: proto3 JSON writes "NaN" itself).
    t = stub.Predict(pb.PredictRequest(endpoint="logs", inputs=[pb.Tensor(name="x", shape=[1, 4],
                                                                           float_values=X[0].tolist())])).outputs[0]
    assert t.float_values[0] == -math.inf and math.isnan(t.float_values[1])


@pytest.mark.parametrize("shape, raw", [([1] * 100, bytes(4)), ([0, 2**62], b""), ([0, 2**40, 2**40], b"")],
                         ids=["100-dims", "zero-by-huge", "zero-by-huge-by-huge"])
def test_shapes_numpy_cannot_hold_are_invalid_argument(stub, shape: list[int], raw: bytes) -> None:  # noqa: ANN001
    details = _fails(lambda: stub.Predict(pb.PredictRequest(endpoint="lim", inputs=[
        pb.Tensor(name="input", shape=shape, raw=raw)])))
    assert details.startswith("inputs[0]: input 'input': shape "), details


def test_an_undecodable_predict_is_invalid_argument(inference: Inference) -> None:
    call = inference.channel().unary_unary("/strata.inference.v1.InferenceService/Predict")
    with pytest.raises(grpc.RpcError) as err:
        call(b"\x0a\x05ab")  # endpoint: 5 bytes announced, 2 sent
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == ("the request does not decode as strata.inference.v1.PredictRequest: "
                                   "Wire format was corrupt")
