"""Predict in its three input forms, bad input with the right status and a message naming the
problem (the server keeps serving), the bounded queue, sha256 verification before load, and the
memory budget (least recently used model unloaded first)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import struct_pb2
from strata.common.v1 import types_pb2
from strata.inference.v1 import inference_pb2 as pb

from tests.inference.conftest import Inference, Registry, policy, start_inference
from tests.processes import stop_process


@pytest.fixture(scope="module")
def stub(inference: Inference):  # noqa: ANN201
    s = inference.stub()
    s.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(name="p", policy=policy(("mlp", 3, 1)))))
    return s


def _direct(registry: Registry, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(registry.artifacts[("mlp", 3)]).run(None, {"input": x})[0]


def test_raw_tensor_in_raw_tensor_out(stub, registry: Registry) -> None:  # noqa: ANN001
    x = np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32)
    r = stub.Predict(pb.PredictRequest(endpoint="p", inputs=[pb.Tensor(name="input", shape=[5, 32], raw=x.tobytes())]))
    out = np.frombuffer(r.outputs[0].raw, np.float32).reshape(5, 2)
    np.testing.assert_allclose(out, _direct(registry, x), rtol=1e-5, atol=1e-5)


def test_value_lists_and_rows_for_json_clients(stub, registry: Registry) -> None:  # noqa: ANN001
    x = np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)
    r = stub.Predict(pb.PredictRequest(endpoint="p", inputs=[
        pb.Tensor(name="input", shape=[3, 32], float_values=x.reshape(-1).tolist())]))
    assert r.outputs[0].dtype == types_pb2.DATA_TYPE_FLOAT32
    np.testing.assert_allclose(np.array(r.outputs[0].float_values).reshape(3, 2), _direct(registry, x), rtol=1e-5,
                               atol=1e-5)
    rows = []
    for row in x:
        s = struct_pb2.Struct()
        s.update({"input": row.tolist()})
        rows.append(s)
    r = stub.Predict(pb.PredictRequest(endpoint="p", rows=rows))
    got = np.array([[v.number_value for v in row.fields["output"].list_value.values] for row in r.rows])
    np.testing.assert_allclose(got, _direct(registry, x), rtol=1e-5, atol=1e-5)


def _row(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@pytest.mark.parametrize("request_, code, message", [
    (pb.PredictRequest(endpoint="p", inputs=[pb.Tensor(name="input", dtype=types_pb2.DATA_TYPE_FLOAT64, shape=[1, 32],
                                                       raw=bytes(8 * 32))]),
     grpc.StatusCode.INVALID_ARGUMENT, "input 'input' has datatype FP64, the model expects FP32"),
    (pb.PredictRequest(endpoint="p", inputs=[pb.Tensor(name="input", shape=[1, 30], raw=bytes(4 * 30))]),
     grpc.StatusCode.INVALID_ARGUMENT, "input 'input' has shape [1, 30], the model expects [-1, 32]"),
    (pb.PredictRequest(endpoint="p", inputs=[pb.Tensor(name="input", shape=[1, 32], raw=bytes(12))]),
     grpc.StatusCode.INVALID_ARGUMENT, "input 'input': 12 bytes of data, shape [1, 32] of FP32 needs 128"),
    (pb.PredictRequest(endpoint="p", inputs=[pb.Tensor(name="feat", shape=[1, 32], raw=bytes(128))]),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'feat'"),
    (pb.PredictRequest(endpoint="p", rows=[_row(input=[1.0] * 32), _row(other=1.0)]),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'other'"),
    (pb.PredictRequest(endpoint="p", rows=[_row(input="seven")]),
     grpc.StatusCode.INVALID_ARGUMENT, "input 'input': values do not fit FP32"),
    (pb.PredictRequest(endpoint="p", inputs=[pb.Tensor(name="input", shape=[2000, 32], raw=bytes(4 * 32 * 2000))]),
     grpc.StatusCode.INVALID_ARGUMENT, "batch of 2000 rows exceeds the max batch size 1024"),
    (pb.PredictRequest(endpoint="p"), grpc.StatusCode.INVALID_ARGUMENT, "inputs: no inputs"),
    (pb.PredictRequest(endpoint="nowhere", inputs=[pb.Tensor(name="input", shape=[1, 32], raw=bytes(128))]),
     grpc.StatusCode.NOT_FOUND, "endpoints/nowhere not found"),
], ids=["dtype", "shape", "byte-count", "unknown-input", "row-unknown-input", "row-bad-value", "oversized", "empty",
        "unknown-endpoint"])
def test_bad_input(stub, request_: pb.PredictRequest, code: grpc.StatusCode, message: str) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request_)
    assert err.value.code() == code
    assert message in err.value.details(), err.value.details()
    ok = stub.Predict(pb.PredictRequest(endpoint="p", inputs=[pb.Tensor(name="input", shape=[1, 32], raw=bytes(128))]))
    assert ok.version == 3


def test_invalid_policies_name_the_field(stub) -> None:  # noqa: ANN001
    cases = [
        (pb.TrafficPolicy(), "policy.targets: at least one target is required"),
        (policy(("mlp", 1, 0)), "policy.targets: the weights must add up to more than 0"),
        (policy(("mlp", 1, 1), canary=pb.CanaryLimits(target_index=3, max_error_rate=0.1)),
         "policy.canary.target_index"),
        (policy(("mlp", 1, 1), batching=pb.BatchingConfig(max_batch_size=100_000)), "policy.batching.max_batch_size"),
        (policy(("ghost", 1, 1)), "models/ghost/versions/1 not found in the registry"),
        (pb.TrafficPolicy(targets=[pb.Target(model="mlp", version=1, alias="champion", weight=1)]),
         "policy.targets[0].alias: give a version or an alias, not both"),
        (pb.TrafficPolicy(targets=[pb.Target(model="mlp", alias="nosuchalias", weight=1)]),
         "models/mlp/aliases/nosuchalias not found in the registry"),
    ]
    for pol, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="p", policy=pol))
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert message in err.value.details(), err.value.details()
    assert stub.GetEndpoint(pb.GetEndpointRequest(name="p")).endpoint.revision == 1  # nothing changed


def test_a_full_queue_answers_resource_exhausted(stub) -> None:  # noqa: ANN001
    stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(name="tight", policy=policy(
        ("slow", 1, 1), batching=pb.BatchingConfig(max_batch_size=1, max_queue_size=1)))))
    x = np.ones((64, 32), np.float32)
    req = pb.PredictRequest(endpoint="tight", inputs=[pb.Tensor(name="input", shape=[64, 32], raw=x.tobytes())])

    def call(_: int) -> grpc.StatusCode:
        try:
            stub.Predict(req)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            assert "queue is full" in e.details()
            return e.code()
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(48)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes


@pytest.fixture()
def small(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    # Room for two of the test MLPs (about 0.6 MB each in memory) but not three.
    srv = start_inference(registry, tmp_path_factory.mktemp("small"), STRATA_INFERENCE_MEMORY_BUDGET_MB="1.5")
    try:
        yield srv
    finally:
        stop_process(srv.proc)


def _loaded(stub) -> set[tuple[str, int, str]]:  # noqa: ANN001
    return {(m.model, m.version, m.state) for m in stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models}


def test_memory_budget_unloads_the_least_recently_used_model(small: Inference) -> None:
    stub = small.stub()
    for v in (1, 2):
        stub.LoadModel(pb.LoadModelRequest(model="mlp", version=v))
    stub.LoadModel(pb.LoadModelRequest(model="mlp", version=1))  # touch v1: v2 is now the oldest
    stub.LoadModel(pb.LoadModelRequest(model="mlp", version=3))
    assert _loaded(stub) == {("mlp", 1, "READY"), ("mlp", 3, "READY")}


def test_artifact_is_verified_before_every_load(small: Inference) -> None:
    stub = small.stub()
    loaded = stub.LoadModel(pb.LoadModelRequest(model="mlp", version=2)).model
    stub.UnloadModel(pb.UnloadModelRequest(model="mlp", version=2))
    cached = small.home / "inference" / "cache" / f"{loaded.sha256}.onnx"
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the cached copy
    cached.write_bytes(bytes(data))
    with pytest.raises(grpc.RpcError) as err:
        stub.LoadModel(pb.LoadModelRequest(model="mlp", version=2))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not match the registry's" in err.value.details()
    # The bad copy was discarded: the next load fetches a verified one from the registry.
    assert stub.LoadModel(pb.LoadModelRequest(model="mlp", version=2)).model.sha256 == loaded.sha256
