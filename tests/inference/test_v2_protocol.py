"""The stock tritonclient[grpc] client against the running inference service: results equal
onnxruntime run directly on the same inputs.

This module must not import Strata's own V2 stubs (strata.kserve.v2): tritonclient registers the
same proto symbols in the default descriptor pool, and the two would clash in one process."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.inference.conftest import Inference, Registry


@pytest.fixture(scope="module")
def client(inference: Inference) -> tc.InferenceServerClient:
    c = tc.InferenceServerClient(inference.addr)
    c.load_model("mlp", config=None)  # newest version (3)
    c.load_model("fixed")
    return c


def _direct(blob: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_server_live_ready_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "strata"
    assert "model_repository" in meta.extensions


def test_model_metadata_and_config(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("mlp")
    assert meta.platform == "onnxruntime_onnx"
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("input", "FP32", [-1, 32])]
    assert [(o.name, o.datatype, list(o.shape)) for o in meta.outputs] == [("output", "FP32", [-1, 2])]
    assert "3" in meta.versions
    cfg = client.get_model_config("mlp").config
    assert cfg.max_batch_size > 0 and list(cfg.input[0].dims) == [32]
    assert client.get_model_config("fixed").config.max_batch_size == 0


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_model_infer_matches_onnxruntime(client: tc.InferenceServerClient, registry: Registry, rows: int) -> None:
    x = np.random.default_rng(rows).standard_normal((rows, 32)).astype(np.float32)
    inp = tc.InferInput("input", [rows, 32], "FP32")
    inp.set_data_from_numpy(x)  # raw_input_contents, as tritonclient always sends
    res = client.infer("mlp", [inp], outputs=[tc.InferRequestedOutput("output")], request_id="r-1")
    assert res.get_response().model_version == "3"
    assert res.get_response().id == "r-1"
    np.testing.assert_allclose(res.as_numpy("output"), _direct(registry.artifacts[("mlp", 3)], x), rtol=1e-5, atol=1e-5)


def test_model_infer_specific_version(client: tc.InferenceServerClient, registry: Registry, inference: Inference) -> None:
    client.load_model("mlp")  # idempotent
    from strata.inference.v1 import inference_pb2 as pb
    inference.stub().LoadModel(pb.LoadModelRequest(model="mlp", version=1))
    x = np.ones((2, 32), np.float32)
    inp = tc.InferInput("input", [2, 32], "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("mlp", [inp], model_version="1")
    assert res.get_response().model_version == "1"
    np.testing.assert_allclose(res.as_numpy("output"), _direct(registry.artifacts[("mlp", 1)], x), rtol=1e-5, atol=1e-5)


def test_typed_contents_are_accepted(inference: Inference, registry: Registry, client: tc.InferenceServerClient) -> None:
    # tritonclient's own generated messages (ours would clash with them in one process).
    from tritonclient.grpc import service_pb2 as v2
    from tritonclient.grpc import service_pb2_grpc as v2g
    x = np.arange(64, dtype=np.float32).reshape(2, 32) / 64
    req = v2.ModelInferRequest(model_name="mlp", model_version="3")
    t = req.inputs.add(name="input", datatype="FP32", shape=[2, 32])
    t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    resp = v2g.GRPCInferenceServiceStub(inference.channel()).ModelInfer(req)
    y = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 2)
    np.testing.assert_allclose(y, _direct(registry.artifacts[("mlp", 3)], x), rtol=1e-5, atol=1e-5)


def test_statistics_and_repository_index(client: tc.InferenceServerClient) -> None:
    stats = client.get_inference_statistics("mlp").model_stats
    assert stats and stats[0].inference_count > 0 and stats[0].execution_count > 0
    index = {(m.name, m.version, m.state) for m in client.get_model_repository_index().models}
    assert ("mlp", "3", "READY") in index


@pytest.mark.parametrize("case", ["dtype", "shape", "missing", "unknown_model", "unknown_version", "oversized"])
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(client: tc.InferenceServerClient, case: str) -> None:
    model, version = "mlp", ""
    if case == "dtype":
        inp = tc.InferInput("input", [1, 32], "FP64")
        inp.set_data_from_numpy(np.zeros((1, 32), np.float64))
        want = ("INVALID_ARGUMENT", "input 'input' has datatype FP64, the model expects FP32")
    elif case == "shape":
        inp = tc.InferInput("input", [1, 31], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 31), np.float32))
        want = ("INVALID_ARGUMENT", "input 'input' has shape [1, 31], the model expects [-1, 32]")
    elif case == "missing":
        inp = tc.InferInput("other", [1, 32], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 32), np.float32))
        want = ("INVALID_ARGUMENT", "unknown input 'other'")
    elif case == "oversized":
        inp = tc.InferInput("input", [5000, 32], "FP32")
        inp.set_data_from_numpy(np.zeros((5000, 32), np.float32))
        want = ("INVALID_ARGUMENT", "batch of 5000 rows exceeds the max batch size 1024")
    else:
        inp = tc.InferInput("input", [1, 32], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 32), np.float32))
        model, version = ("nope", "") if case == "unknown_model" else ("mlp", "42")
        want = ("NOT_FOUND", "model 'nope' is not loaded" if case == "unknown_model" else "model 'mlp' version 42 is not loaded")
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [inp], model_version=version)
    assert want[0] in str(err.value.status()), err.value
    assert want[1] in err.value.message(), err.value.message()
    ok = tc.InferInput("input", [1, 32], "FP32")
    ok.set_data_from_numpy(np.zeros((1, 32), np.float32))
    assert client.infer("mlp", [ok]).as_numpy("output").shape == (1, 2)
