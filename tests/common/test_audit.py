"""Audit rows name the resource of every mutating call, including calls refused before the
servicer ran (the role check) or before it named the resource (a bad argument): the
interceptor derives the name from the request with the method's resource template, which comes
from its `google.api.http` path (or is declared in code for the fixed V2 protocol)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from strata.features.v1 import features_pb2
from strata.inference.v1 import inference_pb2
from strata.registry.v1 import registry_pb2 as pb
from strata.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.audit import request_resource
from services.common.auth import mint_token
from services.common.kserve_access import V2_POLICIES
from services.common.policy import policies_for
from services.common.server import serve
from services.common.settings import ServiceSettings
from services.registry.app import build_service
from tests.processes import free_port

SECRET = "audit-test-secret-0123456789abcdef0123"
SERVICES = [registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
            features_pb2.DESCRIPTOR.services_by_name["FeatureService"],
            inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]]


def _filled(msg: Message, depth: int = 0) -> Message:
    """Every scalar field of the message (and of its nested messages) set: strings to "r<n>",
    numbers to their field number."""
    for f in msg.DESCRIPTOR.fields:
        if f.is_repeated:
            continue
        if f.type == FieldDescriptor.TYPE_STRING:
            setattr(msg, f.name, f"r{f.number}")
        elif f.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
            setattr(msg, f.name, f.number)
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 2 and not f.message_type.full_name.startswith(
                "google.protobuf."):
            _filled(getattr(msg, f.name), depth + 1)
    return msg


def test_every_mutating_rpc_derives_its_resource_from_the_request() -> None:
    policies = {**policies_for(SERVICES), **V2_POLICIES}
    mutating = [p for p in policies.values() if p.mutates]
    assert len(mutating) > 20
    for svc_desc in SERVICES:
        for m in svc_desc.methods:
            p = policies[f"/{svc_desc.full_name}/{m.name}"]
            if not p.mutates:
                continue
            request = _filled(message_factory.GetMessageClass(m.input_type)())
            resource = request_resource(p.resource, request)
            # The collection, then the request's identifying fields (a create whose id the
            # server assigns, such as a batch job, names the collection).
            assert resource and "{" not in resource and resource[0].isalpha(), (m.name, p.resource, resource)
            assert "/r" in resource or "/" not in p.resource, (m.name, p.resource, resource)
    assert all(p.resource for p in V2_POLICIES.values() if p.mutates)


def test_resource_names_follow_the_http_paths() -> None:
    policies = policies_for(SERVICES)

    def name(method: str, request: Message) -> str:
        return request_resource(policies[method].resource, request)
    reg = "/strata.registry.v1.RegistryService/"
    assert name(reg + "DeleteRegisteredModel", pb.DeleteRegisteredModelRequest(name="fraud")) == "models/fraud"
    assert name(reg + "CreateRegisteredModel", pb.CreateRegisteredModelRequest(
        registered_model=pb.RegisteredModel(name="fraud"))) == "models/fraud"
    assert name(reg + "UpdateModelVersion", pb.UpdateModelVersionRequest(
        model_version=pb.ModelVersion(name="fraud", version=3))) == "models/fraud/versions/3"
    assert name(reg + "RequestPromotion", pb.RequestPromotionRequest(name="fraud", version=2)) == \
        "models/fraud/versions/2"
    assert name(reg + "ApprovePromotion", pb.ApprovePromotionRequest(promotion_id="p1")) == "promotions/p1"
    inf = "/strata.inference.v1.InferenceService/"
    assert name(inf + "SetTrafficPolicy", inference_pb2.SetTrafficPolicyRequest(endpoint="ep")) == "endpoints/ep"
    assert name(inf + "CreateEndpoint", inference_pb2.CreateEndpointRequest(
        endpoint=inference_pb2.Endpoint(name="ep"))) == "endpoints/ep"
    assert name("/strata.features.v1.FeatureService/Materialize",
                features_pb2.MaterializeRequest(view="txn")) == "featureViews/txn"
    # What a client sends is quoted, never unbounded: the row keeps a bounded name.
    assert len(name(reg + "DeleteRegisteredModel", pb.DeleteRegisteredModelRequest(name="x" * 100_000))) <= 512
    assert request_resource("models/{name}", object()) == ""  # a request stream: nothing to read


async def test_refused_calls_are_audited_with_their_resource(tmp_path: Path) -> None:
    port = free_port()
    settings = ServiceSettings.for_service("registry", home=tmp_path, host="127.0.0.1", port=port, metrics_port=0,
                                           jwt_secret=SECRET)
    started, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(build_service(settings), started, stop))
    await asyncio.wait_for(started.wait(), 20)

    def md(sub: str, *roles: str) -> tuple:
        return (("authorization", f"Bearer {mint_token(SECRET, sub, list(roles))}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = registry_pb2_grpc.RegistryServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:  # refused by the role check
                await stub.DeleteRegisteredModel(pb.DeleteRegisteredModelRequest(name="fraud"),
                                                 metadata=md("vic", "viewer"))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ApprovePromotion(pb.ApprovePromotionRequest(promotion_id="p-77"),
                                            metadata=md("devon", "developer"))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            events = (await stub.ListAuditEvents(registry_pb2.ListAuditEventsRequest(),
                                                 metadata=md("ada", "approver"))).audit_events
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    rows = [(ev.principal, ev.method.rsplit("/", 1)[-1], ev.resource, ev.outcome) for ev in events]
    assert ("vic", "DeleteRegisteredModel", "models/fraud", "PERMISSION_DENIED") in rows, rows
    assert ("devon", "ApprovePromotion", "promotions/p-77", "PERMISSION_DENIED") in rows, rows
