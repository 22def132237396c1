"""Inference through the gateway as users reach it: a registry, the inference service (two
serving processes) and a real Envoy with JWT auth. REST/JSON for the platform's API (create an
endpoint, predict with rows and with tensors, set traffic, roll back) and native gRPC passthrough
for the KServe V2 protocol with the stock tritonclient."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from gateway.config import render_envoy_config
from gateway.envoy import start_envoy, wait_ready, write_config
from services.clients.registry import RegistryClient
from services.common.auth import mint_token
from tests.inference.models import log, mlp
from tests.processes import free_port, start_service, stop_process

ROOT = Path(__file__).resolve().parents[2]
SECRET = "e2e-inference-secret-0123456789abcdef"


@dataclass
class Gateway:
    rest: str
    grpc: str
    blobs: dict[int, bytes]

    def headers(self, *roles: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {mint_token(SECRET, 'e2e-' + '-'.join(roles), list(roles))}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    home = tmp_path_factory.mktemp("e2e-inference")
    env = {"STRATA_JWT_SECRET": SECRET}
    reg_port, inf_port, gw_port, admin_port = free_port(), free_port(), free_port(), free_port()
    procs = [start_service("registry", home / "registry", reg_port, env)]
    blobs = {1: mlp(seed=11), 2: mlp(seed=12)}
    try:
        with RegistryClient(f"127.0.0.1:{reg_port}", mint_token(SECRET, "setup", ["developer"])) as c:
            for v, blob in blobs.items():
                path = home / f"m{v}.onnx"
                path.write_bytes(blob)
                c.register_onnx("scorer", path, create_model=(v == 1))
            (home / "log.onnx").write_bytes(log())  # y = log(x): NaN and infinities from finite inputs
            c.register_onnx("logfn", home / "log.onnx", create_model=True)
            c.register_onnx("logfn", home / "log.onnx", allow_nan=True)
        procs.append(start_service("inference", home / "inference", inf_port, {
            **env, "STRATA_REGISTRY_ADDR": f"127.0.0.1:{reg_port}", "STRATA_INFERENCE_WORKERS": "2"}))
        config = render_envoy_config(
            upstreams={"registry": f"127.0.0.1:{reg_port}", "inference": f"127.0.0.1:{inf_port}"},
            descriptor_path=ROOT / "gateway" / "strata.pb", jwt_secret=SECRET, listen_host="127.0.0.1",
            listen_port=gw_port, admin_port=admin_port)
        procs.append(start_envoy(write_config(config, home / "gateway"), home / "envoy.log"))
        wait_ready(admin_port, 20, process=procs[-1])
        yield Gateway(f"http://127.0.0.1:{gw_port}", f"127.0.0.1:{gw_port}", blobs)
    finally:
        for p in reversed(procs):
            stop_process(p)


def _expected(blob: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(blob).run(None, {"input": x})[0]


def test_deploy_predict_switch_and_roll_back_over_rest(gw: Gateway) -> None:
    dev, viewer = gw.headers("developer"), gw.headers("viewer")
    r = requests.post(f"{gw.rest}/v1/endpoints", headers=dev, json={"endpoint": {
        "name": "fraud", "policy": {"targets": [{"model": "scorer", "alias": "", "version": 1, "weight": 100}]}}})
    assert r.status_code == 200, r.text
    assert r.json()["endpoint"]["revision"] == "1"
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    r = requests.post(f"{gw.rest}/v1/endpoints/fraud:predict", headers=viewer,
                      json={"rows": [{"input": row.tolist()} for row in x], "request_id": "rest-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["request_id"]) == ("scorer", "1", "rest-1")
    got = np.array([row["output"] for row in body["rows"]], dtype=np.float32)
    np.testing.assert_allclose(got, _expected(gw.blobs[1], x), rtol=1e-5, atol=1e-5)
    # Tensor form with JSON value lists.
    r = requests.post(f"{gw.rest}/v1/endpoints/fraud:predict", headers=viewer, json={"inputs": [
        {"name": "input", "shape": [3, 32], "float_values": x.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    np.testing.assert_allclose(np.array(out["float_values"], np.float32).reshape(3, 2), _expected(gw.blobs[1], x),
                               rtol=1e-5, atol=1e-5)
    # Blue/green to version 2, then back.
    r = requests.post(f"{gw.rest}/v1/endpoints/fraud:setTrafficPolicy", headers=dev, json={
        "policy": {"targets": [{"model": "scorer", "version": 2, "weight": 1}]}})
    assert r.status_code == 200 and r.json()["endpoint"]["revision"] == "2", r.text
    r = requests.post(f"{gw.rest}/v1/endpoints/fraud:predict", headers=viewer, json={"rows": [{"input": x[0].tolist()}]})
    assert r.json()["version"] == "2"
    r = requests.post(f"{gw.rest}/v1/endpoints/fraud:rollback", headers=dev, json={})
    assert r.status_code == 200 and r.json()["endpoint"]["revision"] == "3", r.text
    r = requests.post(f"{gw.rest}/v1/endpoints/fraud:predict", headers=viewer, json={"rows": [{"input": x[0].tolist()}]})
    assert r.json()["version"] == "1"


def test_rest_errors(gw: Gateway) -> None:
    viewer = gw.headers("viewer")
    assert requests.post(f"{gw.rest}/v1/endpoints/fraud:predict", json={"rows": []}).status_code == 401
    r = requests.post(f"{gw.rest}/v1/endpoints", headers=viewer, json={"endpoint": {"name": "x"}})
    assert r.status_code == 403
    r = requests.post(f"{gw.rest}/v1/endpoints/fraud:predict", headers=viewer,
                      json={"rows": [{"input": [1.0] * 31}]})
    assert r.status_code == 400 and "the model expects [-1, 32]" in r.json()["message"], r.text
    r = requests.post(f"{gw.rest}/v1/endpoints/nowhere:predict", headers=viewer, json={"rows": [{"input": [1.0] * 32}]})
    assert r.status_code == 404, r.text


def test_v2_protocol_through_the_gateway_with_tritonclient(gw: Gateway) -> None:
    client = tc.InferenceServerClient(gw.grpc)
    assert client.is_server_live()  # public probe: no token needed
    headers = gw.headers("viewer")
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    inp = tc.InferInput("input", [4, 32], "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("fraud", [inp], headers={k.lower(): v for k, v in headers.items()})
    assert res.get_response().model_version in ("1", "2")
    want = _expected(gw.blobs[int(res.get_response().model_version)], x)
    np.testing.assert_allclose(res.as_numpy("output"), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InferenceServerException) as err:
        client.infer("fraud", [inp])  # no token
    assert "UNAUTHENTICATED" in str(err.value.status())


def test_non_finite_values_cross_the_gateway_as_proto3_json_writes_them(gw: Gateway) -> None:
    dev, viewer = gw.headers("developer"), gw.headers("viewer")
    for name, version in (("logs", 1), ("lognan", 2)):
        r = requests.post(f"{gw.rest}/v1/endpoints", headers=dev, json={"endpoint": {
            "name": name, "policy": {"targets": [{"model": "logfn", "version": version, "weight": 1}]}}})
        assert r.status_code == 200, r.text
    x = [0.0, -1.0, 1.0, 2.0]  # log: -inf, NaN, 0, 0.69
    # Rows (google.protobuf.Struct): JSON has no NaN; the transcoder refused the response (502).
    r = requests.post(f"{gw.rest}/v1/endpoints/logs:predict", headers=viewer, json={"rows": [{"x": x}]})
    assert r.status_code == 200, r.text
    assert r.json()["rows"][0]["y"][:3] == ["-Infinity", "NaN", 0.0]
    # Tensors (double fields): proto3 JSON's own spelling.
    r = requests.post(f"{gw.rest}/v1/endpoints/logs:predict", headers=viewer, json={"inputs": [
        {"name": "x", "shape": [1, 4], "float_values": x}]})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["float_values"][:3] == ["-Infinity", "NaN", 0]
    # NaN inputs, spelled the same way: refused by a model whose signature does not allow them
    # (400 naming the input), scored by one whose signature does.
    nan_in = {"inputs": [{"name": "x", "shape": [1, 4], "float_values": ["NaN", 1, 1, 1]}]}
    r = requests.post(f"{gw.rest}/v1/endpoints/logs:predict", headers=viewer, json=nan_in)
    assert r.status_code == 400 and r.json()["message"].startswith("inputs[x]: input 'x' holds NaN"), r.text
    r = requests.post(f"{gw.rest}/v1/endpoints/lognan:predict", headers=viewer, json=nan_in)
    assert r.status_code == 200 and r.json()["outputs"][0]["float_values"][0] == "NaN", r.text


def test_a_huge_name_is_a_400_quoting_it_short(gw: Gateway) -> None:
    # Echoed whole in the error, a 1 MiB name made the status too large for Envoy: a 502.
    r = requests.post(f"{gw.rest}/v1/endpoints", headers=gw.headers("developer"), json={"endpoint": {
        "name": "e" * (1 << 20), "policy": {"targets": [{"model": "scorer", "version": 1, "weight": 1}]}}})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["message"].startswith("endpoint.name: 'eee") and len(r.text) < 2048, r.text[:300]
