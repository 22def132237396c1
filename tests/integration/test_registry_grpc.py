"""The registry as a real process on loopback, over gRPC, with JWT auth, on SQLite and on
PostgreSQL."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from strata.registry.v1 import registry_pb2 as pb

from services.clients.registry import RegistryClient
from services.common.auth import mint_token
from tests.conftest import make_onnx_model
from tests.processes import free_port, start_service, stop_process

SECRET = "integration-secret-0123456789abcdef0123"
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


@dataclass
class Server:
    addr: str
    home: Path
    proc: subprocess.Popen
    metrics_port: int

    def client(self, sub: str, *roles: str, secret: str = SECRET, ttl: int = 300) -> RegistryClient:
        return RegistryClient(self.addr, mint_token(secret, sub, list(roles), ttl_seconds=ttl))


def _start(home: Path, database_url: str) -> Server:
    port, metrics = free_port(), free_port()
    proc = start_service("registry", home, port, {
        "STRATA_JWT_SECRET": SECRET, "STRATA_REGISTRY_DATABASE_URL": database_url,
        "STRATA_REGISTRY_METRICS_PORT": str(metrics)})
    return Server(f"127.0.0.1:{port}", home, proc, metrics)


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    s = _start(tmp_path / "home", database_url)
    yield s
    stop_process(s.proc)


def _code(call) -> grpc.StatusCode:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_full_flow_over_grpc(server: Server, tmp_path: Path) -> None:
    data = make_onnx_model(pad_bytes=5 << 20)
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    with server.client("alice", "developer") as dev:
        v = dev.register_onnx("flow", path, create_model=True, metrics={"auc": 0.9})
        assert v.status == pb.MODEL_VERSION_STATUS_READY and v.artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert dev.stub.SetModelAlias(pb.SetModelAliasRequest(name="flow", alias="challenger", version=1))
        listed = dev.stub.ListRegisteredModels(pb.ListRegisteredModelsRequest()).registered_models
        assert [(m.name, dict(m.aliases)) for m in listed] == [("flow", {"challenger": 1})]
        out = tmp_path / "down.onnx"
        dev.download_artifact("flow", 1, out)
        assert out.read_bytes() == data


def test_a_failed_registration_is_invisible_over_grpc(server: Server, tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.onnx", tmp_path / "good.onnx"
    bad.write_bytes(b"not an onnx model" * 64)
    good.write_bytes(make_onnx_model())
    with server.client("alice", "developer") as dev:
        # (register_onnx with create_model checks the file before creating anything; the server's
        # own refusal is what this test is about, so the model exists first.)
        dev.stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(
            registered_model=pb.RegisteredModel(name="atomic")))
        with pytest.raises(grpc.RpcError) as e:
            dev.register_onnx("atomic", bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("artifact:")
        assert _code(lambda: dev.stub.GetModelVersion(pb.GetModelVersionRequest(name="atomic", version=1))) \
            == grpc.StatusCode.NOT_FOUND
        assert list(dev.list_all_versions("atomic")) == []
        model = dev.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="atomic")).registered_model
        assert model.latest_version == 0
        v = dev.register_onnx("atomic", good)
        assert (v.version, v.status) == (2, pb.MODEL_VERSION_STATUS_READY)  # 1 is never reused
        assert [x.version for x in dev.list_all_versions("atomic")] == [2]
        assert dev.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="atomic")).registered_model \
            .latest_version == 2


def test_authentication_and_roles_are_enforced(server: Server) -> None:
    anonymous = RegistryClient(server.addr)
    req = pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(name="guarded"))
    assert _code(lambda: anonymous.stub.CreateRegisteredModel(req)) == grpc.StatusCode.UNAUTHENTICATED
    with server.client("victor", "viewer") as viewer:
        assert _code(lambda: viewer.stub.CreateRegisteredModel(req)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: viewer.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="guarded"))) \
            == grpc.StatusCode.NOT_FOUND  # nothing was created
    with server.client("mallory", "admin", secret="another-secret-0123456789abcdef0123") as forged:
        assert _code(lambda: forged.stub.CreateRegisteredModel(req)) == grpc.StatusCode.UNAUTHENTICATED
    with server.client("alice", "admin", ttl=-120) as expired:
        assert _code(lambda: expired.stub.CreateRegisteredModel(req)) == grpc.StatusCode.UNAUTHENTICATED


def test_bad_input_is_invalid_argument_with_a_field_violation(server: Server) -> None:
    with server.client("alice", "developer") as dev:
        with pytest.raises(grpc.RpcError) as e:
            dev.stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(
                registered_model=pb.RegisteredModel(name="no spaces allowed")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("registered_model.name:")
    status = rpc_status.from_call(e.value)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "registered_model.name"


def test_promotion_approval_and_audit_over_grpc(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(make_onnx_model())
    with server.client("alice", "approver") as alice, server.client("bob", "approver") as bob:
        alice.register_onnx("audited", path, create_model=True)
        p = alice.stub.RequestPromotion(pb.RequestPromotionRequest(name="audited", version=1)).promotion
        assert p.alias == "production"
        assert _code(lambda: alice.stub.ApprovePromotion(pb.ApprovePromotionRequest(promotion_id=p.promotion_id))) \
            == grpc.StatusCode.PERMISSION_DENIED
        done = bob.stub.ApprovePromotion(pb.ApprovePromotionRequest(promotion_id=p.promotion_id))
        assert list(done.model_version.aliases) == ["production"]
        events = bob.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=100)).audit_events
    seen = [(e.principal, e.method.rsplit("/", 1)[1], e.outcome) for e in events]
    for expected in [("alice", "CreateRegisteredModel", "OK"), ("alice", "CreateModelVersion", "OK"),
                     ("alice", "BeginArtifactUpload", "OK"), ("alice", "CommitArtifactUpload", "OK"),
                     ("alice", "RequestPromotion", "OK"), ("alice", "ApprovePromotion", "PERMISSION_DENIED"),
                     ("bob", "ApprovePromotion", "OK")]:
        assert expected in seen
    assert all(e.request_id for e in events)


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[Server]:
    s = _start(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'registry.db'}")
    yield s
    stop_process(s.proc)


def test_reflection_and_health_with_grpcurl(sqlite_server: Server) -> None:
    listed = subprocess.run([GRPCURL, "-plaintext", sqlite_server.addr, "list"], capture_output=True, text=True,
                            check=True, timeout=30).stdout.split()
    assert {"strata.registry.v1.RegistryService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(listed)
    health = subprocess.run([GRPCURL, "-plaintext", sqlite_server.addr, "grpc.health.v1.Health/Check"],
                            capture_output=True, text=True, check=True, timeout=30).stdout
    assert '"status": "SERVING"' in health
    with grpc.insecure_channel(sqlite_server.addr) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(
            service="strata.registry.v1.RegistryService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_second_registry_on_the_same_port_refuses_to_start(sqlite_server: Server, tmp_path: Path) -> None:
    port = sqlite_server.addr.rsplit(":", 1)[1]
    second = subprocess.run(
        [sys.executable, "-m", "services.registry"], capture_output=True, text=True, timeout=60,
        env={**__import__("os").environ, "STRATA_HOME": str(tmp_path / "other"), "STRATA_AUTH": "disabled",
             "STRATA_REGISTRY_HOST": "127.0.0.1", "STRATA_REGISTRY_PORT": port,
             "STRATA_REGISTRY_METRICS_PORT": str(free_port())})
    assert second.returncode != 0
    assert f"127.0.0.1:{port}" in second.stderr and "port taken" in second.stderr


def test_sigterm_lets_an_inflight_download_finish(sqlite_server: Server, tmp_path: Path) -> None:
    data = make_onnx_model(pad_bytes=40 << 20)
    path = tmp_path / "big.onnx"
    path.write_bytes(data)
    with sqlite_server.client("alice", "developer") as dev:
        dev.register_onnx("big", path, create_model=True)
        received = []
        started = threading.Event()

        def slow_download() -> None:
            for body in dev.stub.DownloadArtifact(pb.DownloadArtifactRequest(name="big", version=1)):
                received.append(body.data)
                started.set()
                time.sleep(0.01)  # a slow client: the call is still running when SIGTERM arrives

        t = threading.Thread(target=slow_download)
        t.start()
        assert started.wait(10)
        sqlite_server.proc.terminate()
        t.join(30)
    assert hashlib.sha256(b"".join(received)).digest() == hashlib.sha256(data).digest()
    assert sqlite_server.proc.wait(30) == 0


def test_metrics_endpoint_counts_rpcs(sqlite_server: Server) -> None:
    with sqlite_server.client("alice", "viewer") as viewer:
        _code(lambda: viewer.stub.GetRegisteredModel(pb.GetRegisteredModelRequest(name="nope")))
    text = urllib.request.urlopen(f"http://127.0.0.1:{sqlite_server.metrics_port}/metrics", timeout=5).read().decode()
    # Counted before the status went out, so the client never sees a call the metrics miss.
    assert 'strata_grpc_requests_total{code="NOT_FOUND",method="GetRegisteredModel",service="registry"} 1.0' in text
    assert "strata_grpc_request_duration_seconds_bucket" in text
