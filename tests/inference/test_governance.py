"""Production endpoints serve only approved versions: a policy of an endpoint marked production
may route returned traffic only to model versions that went through the registry's two-person
promotion (RequestPromotion by one principal, ApprovePromotion by another with the approver
role); shadows are exempt. Checked on every path that changes a policy -- create, set (A/B,
blue/green), rollback, the automatic canary rollback -- and when an endpoint is marked production.
Real registry and inference processes, with authentication on."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2
from strata.inference.v1 import inference_pb2 as pb
from strata.inference.v1 import inference_pb2_grpc
from strata.registry.v1 import registry_pb2 as rpb

from services.clients.registry import RegistryClient
from services.common.auth import mint_token
from tests.inference import models
from tests.processes import free_port, start_service, stop_process

SECRET = "governance-secret-0123456789abcdef0123"
ROWS = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)


@dataclass
class Platform:
    registry_addr: str
    inference_addr: str
    inference_home: Path

    def registry(self, sub: str, *roles: str) -> RegistryClient:
        return RegistryClient(self.registry_addr, mint_token(SECRET, sub, list(roles)))

    def stub(self, sub: str, *roles: str) -> _Stub:
        return _Stub(grpc.insecure_channel(self.inference_addr), mint_token(SECRET, sub, list(roles)))


class _Stub:
    """The inference stub with one principal's bearer token on every call."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self._md = (("authorization", f"Bearer {token}"),)

    def __getattr__(self, name: str):  # noqa: ANN204
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=self._md, timeout=60)


def approve(p: Platform, model: str, version: int) -> None:
    """The two-person rule: a developer asks, another principal with the approver role decides."""
    with p.registry("dana", "developer") as dev, p.registry("ada", "approver") as boss:
        pid = dev.stub.RequestPromotion(rpb.RequestPromotionRequest(
            name=model, version=version, alias="production", reason="tests")).promotion.promotion_id
        boss.stub.ApprovePromotion(rpb.ApprovePromotionRequest(promotion_id=pid, comment="ok"))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("governance")
    port = free_port()
    reg = start_service("registry", home / "registry", port, {"STRATA_JWT_SECRET": SECRET})
    registry_addr = f"127.0.0.1:{port}"
    with RegistryClient(registry_addr, mint_token(SECRET, "dana", ["developer"])) as client:
        blobs = {"gov": [models.mlp(seed=0), models.mlp(seed=1), models.mlp(seed=2)],
                 "flaky": [models.fails_when_large()]}
        for name, versions in blobs.items():
            for i, blob in enumerate(versions):
                path = home / f"{name}-{i + 1}.onnx"
                path.write_bytes(blob)
                client.register_onnx(name, path, create_model=(i == 0))
    p = Platform(registry_addr, "", home / "inference")
    approve(p, "gov", 1)
    approve(p, "flaky", 1)
    iport = free_port()
    inf = start_service("inference", p.inference_home, iport, {
        "STRATA_JWT_SECRET": SECRET, "STRATA_REGISTRY_ADDR": registry_addr, "STRATA_INFERENCE_WORKERS": "1",
        "STRATA_INFERENCE_POLL_SECONDS": "0.05"})
    p.inference_addr = f"127.0.0.1:{iport}"
    try:
        yield p
    finally:
        stop_process(inf)
        stop_process(reg)


def policy(*targets: tuple[str, int, int], shadows: tuple[tuple[str, int], ...] = (),
           **kw: object) -> pb.TrafficPolicy:
    return pb.TrafficPolicy(targets=[pb.Target(model=m, version=v, weight=w) for m, v, w in targets],
                            shadows=[pb.Target(model=m, version=v) for m, v in shadows], **kw)


def create(stub: _Stub, name: str, pol: pb.TrafficPolicy, production: bool) -> pb.Endpoint:
    return stub.CreateEndpoint(pb.CreateEndpointRequest(
        endpoint=pb.Endpoint(name=name, policy=pol, production=production))).endpoint


def set_production(stub: _Stub, name: str, production: bool) -> pb.Endpoint:
    return stub.UpdateEndpoint(pb.UpdateEndpointRequest(
        endpoint=pb.Endpoint(name=name, production=production),
        update_mask=field_mask_pb2.FieldMask(paths=["production"]))).endpoint


def refused(call) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_a_production_endpoint_refuses_a_version_that_was_never_approved(platform: Platform) -> None:
    dev = platform.stub("devon", "developer")
    err = refused(lambda: create(dev, "prod-a", policy(("gov", 2, 1)), production=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "models/gov/versions/2" in err.details() and "endpoint.policy.targets[0]" in err.details()
    with pytest.raises(grpc.RpcError) as gone:
        dev.GetEndpoint(pb.GetEndpointRequest(name="prod-a"))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was created
    # An approved version is served; an unapproved one may shadow it (its results are never returned).
    ep = create(dev, "prod-a", policy(("gov", 1, 1), shadows=(("gov", 3),)), production=True)
    assert ep.production and ep.revision == 1
    r = dev.Predict(pb.PredictRequest(endpoint="prod-a", inputs=[
        pb.Tensor(name="input", shape=list(ROWS.shape), raw=ROWS.tobytes())]))
    assert (r.model, r.version) == ("gov", 1)


def test_an_alias_resolves_to_an_approved_version(platform: Platform) -> None:
    dev = platform.stub("devon", "developer")
    by_alias = pb.TrafficPolicy(targets=[pb.Target(model="gov", alias="production", weight=1)])
    ep = create(dev, "prod-alias", by_alias, production=True)
    assert [(t.model, t.version) for t in ep.policy.targets] == [("gov", 1)]


def test_set_traffic_policy_ab_and_blue_green_need_approved_versions(platform: Platform) -> None:
    dev = platform.stub("devon", "developer")
    create(dev, "prod-b", policy(("gov", 1, 1)), production=True)
    for pol in (policy(("gov", 1, 90), ("gov", 2, 10)),  # A/B or canary with an unapproved version
                policy(("gov", 3, 100))):  # blue/green to an unapproved version
        err = refused(lambda pol=pol: dev.SetTrafficPolicy(
            pb.SetTrafficPolicyRequest(endpoint="prod-b", policy=pol)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        bad = pol.targets[-1]
        assert f"models/gov/versions/{bad.version}" in err.details(), err.details()
        assert f"policy.targets[{len(pol.targets) - 1}]" in err.details()
    assert dev.GetEndpoint(pb.GetEndpointRequest(name="prod-b")).endpoint.revision == 1
    # A non-production endpoint is not governed: a developer may try any version there.
    create(dev, "sandbox", policy(("gov", 1, 1)), production=False)
    dev.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="sandbox", policy=policy(("gov", 3, 1))))


def test_marking_an_endpoint_production_checks_its_current_policy(platform: Platform) -> None:
    dev = platform.stub("devon", "developer")
    create(dev, "grows-up", policy(("gov", 1, 50), ("gov", 2, 50)), production=False)
    err = refused(lambda: set_production(dev, "grows-up", True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "models/gov/versions/2" in err.details()
    assert not dev.GetEndpoint(pb.GetEndpointRequest(name="grows-up")).endpoint.production
    dev.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="grows-up", policy=policy(("gov", 1, 1))))
    assert set_production(dev, "grows-up", True).production


def test_only_an_approver_lifts_production_or_deletes_a_production_endpoint(platform: Platform) -> None:
    dev, boss = platform.stub("devon", "developer"), platform.stub("ada", "approver")
    create(dev, "guarded-prod", policy(("gov", 1, 1)), production=True)
    err = refused(lambda: set_production(dev, "guarded-prod", False))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "approver" in err.details()
    # Deleting and re-creating it without the flag would walk around the rule as well.
    err = refused(lambda: dev.DeleteEndpoint(pb.DeleteEndpointRequest(name="guarded-prod")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "approver" in err.details()
    assert dev.GetEndpoint(pb.GetEndpointRequest(name="guarded-prod")).endpoint.production
    assert not set_production(boss, "guarded-prod", False).production
    dev.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="guarded-prod", policy=policy(("gov", 2, 1))))
    dev.DeleteEndpoint(pb.DeleteEndpointRequest(name="guarded-prod"))


def test_rollback_to_an_unapproved_policy_is_refused(platform: Platform) -> None:
    dev = platform.stub("devon", "developer")
    create(dev, "rb", policy(("gov", 2, 1)), production=False)  # revision 1: unapproved, not yet production
    dev.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="rb", policy=policy(("gov", 1, 1))))
    set_production(dev, "rb", True)
    err = refused(lambda: dev.RollbackTrafficPolicy(pb.RollbackTrafficPolicyRequest(endpoint="rb")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "models/gov/versions/2" in err.details()
    assert dev.GetEndpoint(pb.GetEndpointRequest(name="rb")).endpoint.revision == 2
    # Once the version is approved, the same rollback goes through.
    approve(platform, "gov", 2)
    assert dev.RollbackTrafficPolicy(pb.RollbackTrafficPolicyRequest(endpoint="rb")).endpoint.revision == 3


def test_canary_guard_never_rolls_a_production_endpoint_back_to_an_unapproved_policy(platform: Platform) -> None:
    dev = platform.stub("devon", "developer")
    create(dev, "prod-canary", policy(("gov", 3, 1)), production=False)  # revision 1: never approved
    canary = policy(("gov", 1, 50), ("flaky", 1, 50),
                    canary=pb.CanaryLimits(target_index=1, max_error_rate=0.2, min_requests=10))
    dev.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint="prod-canary", policy=canary))
    set_production(dev, "prod-canary", True)
    bad = np.full((1, 32), 50, np.float32)  # the flaky version fails on these rows
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            dev.Predict(pb.PredictRequest(endpoint="prod-canary", inputs=[
                pb.Tensor(name="input", shape=list(bad.shape), raw=bad.tobytes())]))
        except grpc.RpcError:
            pass
        if dev.GetEndpoint(pb.GetEndpointRequest(name="prod-canary")).endpoint.revision >= 3:
            break
        time.sleep(0.01)
    ep = dev.GetEndpoint(pb.GetEndpointRequest(name="prod-canary")).endpoint
    assert ep.revision == 3 and ep.production
    # Not back to revision 1's unapproved version: the failing canary is drained instead.
    assert [(t.model, t.version) for t in ep.policy.targets] == [("gov", 1)]
    assert not ep.policy.HasField("canary")
    rev = dev.ListPolicyRevisions(pb.ListPolicyRevisionsRequest(endpoint="prod-canary")).revisions[0]
    assert rev.created_by == "strata-canary-guard" and "error rate" in rev.reason, rev.reason


def test_refusals_are_audited_with_the_endpoint(platform: Platform) -> None:
    dev = platform.stub("devon", "developer")
    refused(lambda: create(dev, "prod-audit", policy(("gov", 3, 1)), production=True))
    with sqlite3.connect(platform.inference_home / "inference.db") as db:
        rows = db.execute("SELECT principal, resource, outcome FROM audit_events WHERE method LIKE "
                          "'%CreateEndpoint' ORDER BY id DESC LIMIT 1").fetchall()
    assert rows == [("devon", "endpoints/prod-audit", "FAILED_PRECONDITION")]


def test_the_approver_check_agrees_with_the_platform_role_table() -> None:
    """governance.is_approver keeps its own role names (the role table is built on generated code,
    which the domain does not load); it must answer as the table's ranks do."""
    from strata.common.v1 import options_pb2

    from services.common.auth import Principal
    from services.common.policy import ROLE_NAMES, rank_of
    from services.inference.governance import is_approver

    names = [*ROLE_NAMES.values(), "auditor"]
    for roles in [set(), *({n} for n in names), {"viewer", "developer"}, {"developer", "admin"}]:
        p = Principal("someone", frozenset(roles))
        assert is_approver(p) == (rank_of(p.roles) >= options_pb2.ROLE_APPROVER), roles
