"""The registry's lists and creates follow the platform's conventions (services/common/paging.py,
idempotency.py), through gRPC against a real registry process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from strata.registry.v1 import registry_pb2 as pb
from strata.registry.v1 import registry_pb2_grpc

from tests.conventions import check_page_policy, refused_field, two_pages
from tests.processes import free_port, start_service, stop_process


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry_pb2_grpc.RegistryServiceStub]:
    home: Path = tmp_path_factory.mktemp("registry")
    port = free_port()
    proc = start_service("registry", home, port, {"STRATA_AUTH": "disabled"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield registry_pb2_grpc.RegistryServiceStub(ch)
    finally:
        stop_process(proc)


def test_models_page_in_two_pages_and_tokens_stay_with_their_query(stub) -> None:  # noqa: ANN001
    tag = os.urandom(3).hex()
    for i in range(7):
        stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(
            registered_model=pb.RegisteredModel(name=f"m{tag}_{i}", description=f"pages {tag}")))

    def models(**kw):  # noqa: ANN003, ANN202
        return stub.ListRegisteredModels(pb.ListRegisteredModelsRequest(**kw))
    names, token = two_pages(models, "registered_models", lambda m: m.name, 4, query=tag)
    assert names == sorted(f"m{tag}_{i}" for i in range(7))
    check_page_policy(models, token, query="another query")


def test_versions_page_too(stub) -> None:  # noqa: ANN001
    name = f"v{os.urandom(3).hex()}"
    stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(name=name)))

    def versions(**kw):  # noqa: ANN003, ANN202
        return stub.ListModelVersions(pb.ListModelVersionsRequest(**kw))
    first = versions(name=name, page_size=1)  # drafts are not listed: an empty list, no token
    assert (list(first.model_versions), first.next_page_token) == ([], "")
    check_page_policy(versions, "bm90LWEtdG9rZW4", name=name)


def test_a_retried_create_returns_the_first_result(stub) -> None:  # noqa: ANN001
    name = f"r{os.urandom(3).hex()}"
    req = pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(name=name, description="d"),
                                          request_id=f"create-{name}")
    first = stub.CreateRegisteredModel(req).registered_model
    again = stub.CreateRegisteredModel(req).registered_model  # no ALREADY_EXISTS: the first result
    assert again == first
    v_req = pb.CreateModelVersionRequest(name=name, framework="onnx", request_id=f"version-{name}")
    v1 = stub.CreateModelVersion(v_req).model_version
    assert stub.CreateModelVersion(v_req).model_version.version == v1.version == 1


def test_a_reused_request_id_with_another_payload_is_refused(stub) -> None:  # noqa: ANN001
    name = f"x{os.urandom(3).hex()}"
    rid = f"create-{name}"
    stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(
        registered_model=pb.RegisteredModel(name=name, description="one"), request_id=rid))
    assert refused_field(lambda: stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(
        registered_model=pb.RegisteredModel(name=name, description="two"), request_id=rid))) == "request_id"
    assert refused_field(lambda: stub.CreateRegisteredModel(pb.CreateRegisteredModelRequest(
        registered_model=pb.RegisteredModel(name=f"{name}b"), request_id="x" * 129))) == "request_id"
    v_rid = f"version-{name}"
    stub.CreateModelVersion(pb.CreateModelVersionRequest(name=name, framework="onnx", request_id=v_rid))
    assert refused_field(lambda: stub.CreateModelVersion(pb.CreateModelVersionRequest(
        name=name, framework="sklearn", request_id=v_rid))) == "request_id"
