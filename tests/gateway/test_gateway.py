"""The Envoy gateway: rendered config accepted by Envoy, and REST/gRPC behaviour against a fake upstream."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import requests
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from strata.common.v1 import options_pb2
from strata.registry.v1 import registry_pb2

from gateway.config import MAX_BODY_BYTES, render_envoy_config, template_regex
from gateway.envoy import start_envoy, validate_config, wait_ready, write_config
from tests.processes import free_port, stop_process

DESCRIPTOR = Path(__file__).resolve().parents[2] / "gateway" / "strata.pb"
SECRET = "gateway-test-secret-0123456789abcdef"  # >= 32 bytes: PyJWT warns about shorter HMAC keys
REGISTRY = "/strata.registry.v1.RegistryService"
CHUNK_BYTES = 8 * 1024 * 1024


def token(
    roles: list[str], *, secret: str = SECRET, expires_in: int = 300, sub: str = "alice", drop: str = ""
) -> str:
    """An HS256 token as the services want it; `drop` leaves one claim out."""
    now = int(time.time())
    claims = {
        "iss": "strata",
        "aud": "strata-api",
        "sub": sub,
        "roles": roles,
        "iat": now,
        "exp": now + expires_in,
    }
    claims.pop(drop, None)
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def http_filters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {f["name"]: f["typed_config"] for f in hcm["http_filters"]}


def jwt_rules(config: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = http_filters(config)["envoy.filters.http.jwt_authn"]["rules"]
    return rules


# --- fake registry upstream -------------------------------------------------------------------


async def _list_models(request: registry_pb2.ListRegisteredModelsRequest, context: Any) -> Any:
    return registry_pb2.ListRegisteredModelsResponse()


async def _create_model(request: registry_pb2.CreateRegisteredModelRequest, context: Any) -> Any:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "registered_model.name: must not be empty")


async def _append_chunk(request: registry_pb2.AppendArtifactChunkRequest, context: Any) -> Any:
    return registry_pb2.AppendArtifactChunkResponse(received_bytes=request.offset + len(request.data))


def _unary(fn: Any, request_type: Any, response_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        fn, request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """A grpc.aio server on its own event-loop thread, so blocking `requests` calls cannot stall it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)])
        checker = health.aio.HealthServicer()
        await checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        handlers = {
            "ListRegisteredModels": _unary(
                _list_models,
                registry_pb2.ListRegisteredModelsRequest,
                registry_pb2.ListRegisteredModelsResponse,
            ),
            "CreateRegisteredModel": _unary(
                _create_model,
                registry_pb2.CreateRegisteredModelRequest,
                registry_pb2.CreateRegisteredModelResponse,
            ),
            "AppendArtifactChunk": _unary(
                _append_chunk,
                registry_pb2.AppendArtifactChunkRequest,
                registry_pb2.AppendArtifactChunkResponse,
            ),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(REGISTRY[1:], handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def run_gateway(tmp: Path, **render: Any) -> Iterator[str]:
    """Start Envoy with the rendered config; yield its base URL; always terminate it."""
    port, admin = free_port(), free_port()
    config = render_envoy_config(
        descriptor_path=DESCRIPTOR, listen_host="127.0.0.1", listen_port=port, admin_port=admin, **render
    )
    path = write_config(config, tmp)
    log = tmp / "envoy.log"
    process = start_envoy(path, log)
    try:
        wait_ready(admin, timeout=30, process=process)
        yield f"127.0.0.1:{port}"
    except Exception:
        print(log.read_text())  # shown by pytest on failure
        raise
    finally:
        stop_process(process, timeout=10)


@pytest.fixture(scope="module")
def gateway(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from run_gateway(
        tmp_path_factory.mktemp("envoy"), upstreams={"registry": upstream}, jwt_secret=SECRET
    )


@pytest.fixture(scope="module")
def limited_gateway(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Auth on and a budget of one request per second, to observe whose budget a request uses."""
    yield from run_gateway(
        tmp_path_factory.mktemp("envoy-limited"),
        upstreams={"registry": upstream},
        jwt_secret=SECRET,
        rate_limit_per_second=1,
    )


@pytest.fixture(scope="module")
def open_gateway(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Auth disabled and a one-request-per-second budget, to observe the rate limit."""
    yield from run_gateway(
        tmp_path_factory.mktemp("envoy-open"),
        upstreams={"registry": upstream},
        auth_enabled=False,
        rate_limit_per_second=1,
    )


# --- rendered config ----------------------------------------------------------------------------


def test_rendered_config_passes_envoy_validation(tmp_path: Path) -> None:
    config = render_envoy_config(
        upstreams={"registry": "registry:50051"}, descriptor_path=DESCRIPTOR, jwt_secret=SECRET
    )
    validate_config(write_config(config, tmp_path))
    # The budget is per verified principal, so the JWT is checked before the rate limit.
    assert list(http_filters(config)) == [
        "envoy.filters.http.header_to_metadata",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.buffer",
        "envoy.filters.http.lua",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.rbac",
        "envoy.filters.http.router",
    ]
    transcoder = http_filters(config)["envoy.filters.http.grpc_json_transcoder"]
    assert transcoder["services"] == ["strata.registry.v1.RegistryService"]
    assert jwt_rules(config)[-1] == {"match": {"prefix": "/"}, "requires": {"provider_name": "strata"}}


def test_auth_disabled_has_no_jwt_or_rbac(tmp_path: Path) -> None:
    config = render_envoy_config(
        upstreams={"registry": "127.0.0.1:50051"}, descriptor_path=DESCRIPTOR, auth_enabled=False
    )
    validate_config(write_config(config, tmp_path))
    names = list(http_filters(config))
    assert "envoy.filters.http.jwt_authn" not in names
    assert "envoy.filters.http.rbac" not in names
    assert names[1] == "envoy.filters.http.local_ratelimit" and names[-1] == "envoy.filters.http.router"


def test_unknown_upstream_key_is_refused() -> None:
    with pytest.raises(ValueError, match="trainer"):
        render_envoy_config(
            upstreams={"registry": "127.0.0.1:1", "trainer": "127.0.0.1:2"},
            descriptor_path=DESCRIPTOR,
            jwt_secret=SECRET,
        )


def test_public_method_needs_no_jwt_on_grpc_or_rest_path(tmp_path: Path) -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    registry = next(f for f in fds.file if f.package == "strata.registry.v1")
    method = next(m for m in registry.service[0].method if m.name == "ListRegisteredModels")
    method.options.Extensions[options_pb2.access].min_role = options_pb2.ROLE_UNSPECIFIED
    descriptor = tmp_path / "public.pb"
    descriptor.write_bytes(fds.SerializeToString())

    config = render_envoy_config(
        upstreams={"registry": "127.0.0.1:1"}, descriptor_path=descriptor, jwt_secret=SECRET
    )
    validate_config(write_config(config, tmp_path))
    open_rules = [r["match"] for r in jwt_rules(config) if "requires" not in r]
    assert {"path": f"{REGISTRY}/ListRegisteredModels"} in open_rules
    assert {
        "safe_regex": {"regex": "/v1/models"},
        "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
    } in open_rules
    public = http_filters(config)["envoy.filters.http.rbac"]["rules"]["policies"]["public"]
    assert {"url_path": {"path": {"exact": f"{REGISTRY}/ListRegisteredModels"}}} in public["permissions"]


@pytest.mark.parametrize(
    ("template", "regex"),
    [
        ("/v1/models/{name}", "/v1/models/[^/]+"),
        (
            "/v1/models/{name}/versions/{version}:transitionStage",
            "/v1/models/[^/]+/versions/[^/]+:transitionStage",
        ),
        ("/v1/{name=models/*}/card", "/v1/models/[^/]+/card"),
        ("/v1/files/**", "/v1/files(?:/.*)?"),
    ],
)
def test_template_regex(template: str, regex: str) -> None:
    assert template_regex(template) == regex


# --- live gateway -------------------------------------------------------------------------------


def assert_error(
    r: requests.Response, status: int, code: grpc.StatusCode, message: str | None = None
) -> None:
    """An error as REST clients get it from a service through the transcoder:
    {"code": <gRPC code>, "message": ..., "details": [...]}, as JSON, with the HTTP status."""
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == code.value[0], body
    assert body["details"] == []
    if message is not None:
        assert body["message"] == message


@pytest.mark.e2e
def test_rest_without_token_is_401(gateway: str) -> None:
    r = requests.get(f"http://{gateway}/v1/models", timeout=10)
    assert_error(r, 401, grpc.StatusCode.UNAUTHENTICATED, "Jwt is missing")


@pytest.mark.e2e
def test_rest_viewer_can_list(gateway: str) -> None:
    r = requests.get(f"http://{gateway}/v1/models", headers=bearer(token(["viewer"])), timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"registered_models": [], "next_page_token": ""}


@pytest.mark.e2e
def test_rest_viewer_cannot_create(gateway: str) -> None:
    r = requests.post(
        f"http://{gateway}/v1/models",
        json={"registered_model": {"name": "m"}},
        headers=bearer(token(["viewer"])),
        timeout=10,
    )
    assert_error(r, 403, grpc.StatusCode.PERMISSION_DENIED, "RBAC: access denied")


@pytest.mark.e2e
def test_rest_invalid_argument_is_400_with_grpc_message(gateway: str) -> None:
    r = requests.post(
        f"http://{gateway}/v1/models",
        json={"registered_model": {"name": ""}},
        headers=bearer(token(["developer"])),
        timeout=10,
    )
    assert r.status_code == 400
    assert r.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "registered_model.name" in r.json()["message"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ({"secret": "another-secret-0123456789abcdefgh"}, "Jwt verification fails"),
        ({"expires_in": -600}, "Jwt is expired"),  # beyond Envoy's 60 s clock skew
    ],
)
def test_rest_bad_token_is_401(gateway: str, kind: dict, body: str) -> None:
    # Minted here, not at collection: a suite that runs longer than a token's life would see the
    # wrong-secret token refused as expired first.
    r = requests.get(f"http://{gateway}/v1/models", headers=bearer(token(["admin"], **kind)), timeout=10)
    assert_error(r, 401, grpc.StatusCode.UNAUTHENTICATED, body)


@pytest.mark.e2e
@pytest.mark.parametrize("claim", ["exp", "sub"])
def test_token_the_services_refuse_is_refused_at_the_edge(gateway: str, claim: str) -> None:
    """The services require `exp` and `sub` (services/common/auth.py); so does Envoy."""
    r = requests.get(f"http://{gateway}/v1/models", headers=bearer(token(["viewer"], drop=claim)), timeout=10)
    assert_error(r, 401, grpc.StatusCode.UNAUTHENTICATED)
    with pytest.raises(grpc.RpcError) as refused:
        _grpc_call(
            gateway,
            "ListRegisteredModels",
            registry_pb2.ListRegisteredModelsRequest(),
            registry_pb2.ListRegisteredModelsResponse,
            token(["viewer"], drop=claim),
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.e2e
def test_rest_bad_json_is_400_json(gateway: str) -> None:
    r = requests.post(
        f"http://{gateway}/v1/models",
        data="{bad json",
        headers={**bearer(token(["developer"])), "content-type": "application/json"},
        timeout=10,
    )
    assert_error(r, 400, grpc.StatusCode.INVALID_ARGUMENT)
    assert "bad json" in r.json()["message"]


@pytest.mark.e2e
def test_rest_body_over_the_limit_is_413_json(gateway: str) -> None:
    data = "A" * (MAX_BODY_BYTES + 4)  # valid base64; the JSON around it is over the limit
    r = requests.post(
        f"http://{gateway}/v1/uploads/u1:append",
        data=f'{{"offset": 0, "data": "{data}"}}',
        headers={**bearer(token(["developer"])), "content-type": "application/json"},
        timeout=60,
    )
    assert_error(r, 413, grpc.StatusCode.RESOURCE_EXHAUSTED)


@pytest.mark.e2e
def test_rest_unknown_query_parameter_is_400(gateway: str) -> None:
    r = requests.get(f"http://{gateway}/v1/models?bogus=1", headers=bearer(token(["viewer"])), timeout=10)
    assert_error(r, 400, grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.e2e
def test_rest_unknown_path_is_404(gateway: str) -> None:
    r = requests.get(f"http://{gateway}/v1/nothing-here", headers=bearer(token(["admin"])), timeout=10)
    assert_error(r, 404, grpc.StatusCode.NOT_FOUND)


@pytest.mark.e2e
def test_rest_8mib_chunk_fits_the_body_limits(gateway: str) -> None:
    data = base64.b64encode(bytes(CHUNK_BYTES)).decode()
    r = requests.post(
        f"http://{gateway}/v1/uploads/u1:append",
        json={"offset": 0, "data": data},
        headers=bearer(token(["developer"])),
        timeout=60,
    )
    assert r.status_code == 200, r.text[:500]
    assert r.json() == {"received_bytes": str(CHUNK_BYTES)}  # int64 is a JSON string


@pytest.mark.e2e
def test_grpc_health_needs_no_token(gateway: str) -> None:
    with grpc.insecure_channel(gateway) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _grpc_call(gateway: str, method: str, request: Any, response_type: Any, tok: str | None) -> Any:
    with grpc.insecure_channel(gateway) as channel:
        call = channel.unary_unary(
            f"{REGISTRY}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return call(request, metadata=[("authorization", f"Bearer {tok}")] if tok else None, timeout=10)


@pytest.mark.e2e
def test_grpc_is_authenticated_and_authorised(gateway: str) -> None:
    list_request = registry_pb2.ListRegisteredModelsRequest()
    reply = _grpc_call(
        gateway,
        "ListRegisteredModels",
        list_request,
        registry_pb2.ListRegisteredModelsResponse,
        token(["viewer"]),
    )
    assert list(reply.registered_models) == []

    with pytest.raises(grpc.RpcError) as missing:
        _grpc_call(
            gateway, "ListRegisteredModels", list_request, registry_pb2.ListRegisteredModelsResponse, None
        )
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert missing.value.details() == "Jwt is missing"  # a message, not the REST JSON body

    create = registry_pb2.CreateRegisteredModelRequest(registered_model={"name": "m"})
    with pytest.raises(grpc.RpcError) as denied:
        _grpc_call(
            gateway,
            "CreateRegisteredModel",
            create,
            registry_pb2.CreateRegisteredModelResponse,
            token(["viewer"]),
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.details() == "RBAC: access denied"

    with pytest.raises(grpc.RpcError) as spoofed:  # a REST-looking header does not make it REST
        with grpc.insecure_channel(gateway) as channel:
            channel.unary_unary(
                f"{REGISTRY}/ListRegisteredModels",
                request_serializer=registry_pb2.ListRegisteredModelsRequest.SerializeToString,
                response_deserializer=registry_pb2.ListRegisteredModelsResponse.FromString,
            )(list_request, metadata=[("x-envoy-original-path", "/v1/models")], timeout=10)
    assert spoofed.value.details() == "Jwt is missing"

    with pytest.raises(grpc.RpcError) as unknown:
        _grpc_call(
            gateway, "NoSuchMethod", list_request, registry_pb2.ListRegisteredModelsResponse, token(["admin"])
        )
    assert unknown.value.code() == grpc.StatusCode.PERMISSION_DENIED  # RBAC denies what no policy names


@pytest.mark.e2e
def test_auth_disabled_serves_without_token_and_rate_limits(open_gateway: str) -> None:
    time.sleep(1.1)  # a full bucket, whatever ran before
    assert requests.get(f"http://{open_gateway}/v1/models", timeout=10).status_code == 200
    limited = requests.get(f"http://{open_gateway}/v1/models", timeout=10)
    assert_error(limited, 429, grpc.StatusCode.RESOURCE_EXHAUSTED)
    with pytest.raises(grpc.RpcError) as exhausted:
        _grpc_call(
            open_gateway,
            "ListRegisteredModels",
            registry_pb2.ListRegisteredModelsRequest(),
            registry_pb2.ListRegisteredModelsResponse,
            None,
        )
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _list_rest(gateway: str, sub: str | None) -> requests.Response:
    headers = bearer(token(["viewer"], sub=sub)) if sub else {}
    return requests.get(f"http://{gateway}/v1/models", headers=headers, timeout=10)


def _list_grpc(gateway: str, sub: str) -> grpc.StatusCode:
    try:
        _grpc_call(
            gateway,
            "ListRegisteredModels",
            registry_pb2.ListRegisteredModelsRequest(),
            registry_pb2.ListRegisteredModelsResponse,
            token(["viewer"], sub=sub),
        )
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.e2e
def test_rate_limit_is_per_principal(limited_gateway: str) -> None:
    """One request per second each: carol running out leaves dave's budget whole. (Three calls
    in a row hold at least two in one second, whenever the bucket refills.)"""
    replies = [_list_rest(limited_gateway, "carol") for _ in range(3)]
    assert replies[0].status_code == 200
    limited = [r for r in replies if r.status_code != 200]
    assert limited, [r.status_code for r in replies]
    assert_error(limited[0], 429, grpc.StatusCode.RESOURCE_EXHAUSTED, "local_rate_limited")
    assert _list_rest(limited_gateway, "dave").status_code == 200

    codes = [_list_grpc(limited_gateway, "frank") for _ in range(3)]
    assert codes[0] == grpc.StatusCode.OK and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    assert _list_grpc(limited_gateway, "grace") == grpc.StatusCode.OK

    # REST and gRPC calls of one principal draw on one budget.
    assert _list_rest(limited_gateway, "heidi").status_code == 200
    codes = [_list_grpc(limited_gateway, "heidi") for _ in range(2)]
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes


@pytest.mark.e2e
def test_unauthenticated_requests_use_no_ones_budget(limited_gateway: str) -> None:
    for _ in range(5):
        assert_error(_list_rest(limited_gateway, None), 401, grpc.StatusCode.UNAUTHENTICATED)
    bad_signature = token(["viewer"], sub="erin", secret="another-secret-0123456789abcdefgh")
    r = requests.get(f"http://{limited_gateway}/v1/models", headers=bearer(bad_signature), timeout=10)
    assert_error(r, 401, grpc.StatusCode.UNAUTHENTICATED)
    assert _list_rest(limited_gateway, "erin").status_code == 200
