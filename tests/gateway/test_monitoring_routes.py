"""The gateway routes strata.monitoring.v1 (from the descriptor set, as every service) to a real
monitoring process: REST/JSON transcoded both ways, native gRPC passed through, and the edge's
JWT and RBAC applied to it as to the services' own checks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from google.protobuf import json_format
from strata.inference.v1 import inference_pb2 as ipb
from strata.monitoring.v1 import monitoring_pb2 as mpb
from strata.monitoring.v1 import monitoring_pb2_grpc

from gateway.config import render_envoy_config
from services.inference.predlog_format import Encoder
from tests.gateway.test_gateway import DESCRIPTOR, SECRET, bearer, run_gateway, token
from tests.processes import free_port, start_service, stop_process


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("gw-monitoring")
    port = free_port()
    monitoring = start_service("monitoring", home, port, {"STRATA_JWT_SECRET": SECRET,
                                                          "STRATA_REGISTRY_ADDR": f"127.0.0.1:{free_port()}"})
    try:
        yield from run_gateway(home / "envoy", upstreams={"monitoring": f"127.0.0.1:{port}"}, jwt_secret=SECRET)
    finally:
        stop_process(monitoring)


def _record_json(rid: str) -> dict:
    x = np.array([[0.5]], np.float32)
    raw = Encoder().encode((time.time(), rid, "gw-ep", "gw-model", 1, 1, False, 1.0, {"txn__f0": x},
                            [("label", np.array([1], np.int64))], ""))
    return json_format.MessageToDict(ipb.PredictionRecord.FromString(raw), preserving_proto_field_name=True)


def test_the_monitoring_service_is_routed(tmp_path: Path) -> None:
    config = render_envoy_config(upstreams={"monitoring": "127.0.0.1:1"}, descriptor_path=DESCRIPTOR, jwt_secret=SECRET)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    transcoder = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.grpc_json_transcoder")
    assert "strata.monitoring.v1.MonitoringService" in transcoder["typed_config"]["services"]


def test_monitoring_rest_and_grpc_through_envoy(gateway: str) -> None:
    url = f"http://{gateway}/v1/monitoring"
    # A client stream over REST is a JSON array of its messages (Envoy's transcoder).
    body = [{"records": [_record_json(f"gw-{i}") for i in range(2)]}, {"records": [_record_json("gw-2")]}]
    # Ingestion is a developer's (or the inference service's) call: the edge refuses a viewer.
    r = requests.post(f"{url}/predictions:ingest", json=body, headers=bearer(token(["viewer"])), timeout=30)
    assert r.status_code == 403 and r.json()["code"] == grpc.StatusCode.PERMISSION_DENIED.value[0], r.text
    r = requests.post(f"{url}/predictions:ingest", json=body, headers=bearer(token(["developer"])), timeout=30)
    assert r.status_code == 200, r.text
    assert {k: int(v) for k, v in r.json().items()} == {"received": 3, "stored": 3, "duplicates": 0}

    r = requests.get(f"{url}/performance", params={"endpoint": "gw-ep"}, headers=bearer(token(["viewer"])), timeout=30)
    assert r.status_code == 200, r.text
    [version] = r.json()["versions"]
    assert (version["model"], int(version["version"]), int(version["rows"])) == ("gw-model", 1, 3)

    r = requests.get(f"{url}/performance", params={"endpoint": "nowhere"}, headers=bearer(token(["viewer"])),
                     timeout=30)
    assert r.status_code == 404 and "code" in json.loads(r.text), r.text

    with grpc.insecure_channel(gateway) as channel:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(channel)
        resp = stub.GetPerformance(mpb.GetPerformanceRequest(endpoint="gw-ep"), timeout=30,
                                   metadata=[("authorization", f"Bearer {token(['viewer'])}")])
        assert [(v.model, v.version, v.rows) for v in resp.versions] == [("gw-model", 1, 3)]
        with pytest.raises(grpc.RpcError) as err:
            stub.GetPerformance(mpb.GetPerformanceRequest(endpoint="gw-ep"), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
