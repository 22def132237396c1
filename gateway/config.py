"""Render the Envoy bootstrap of the Strata gateway.

One listener takes REST/JSON and native gRPC. Filters, in decode order:
local_ratelimit -> jwt_authn -> grpc_json_transcoder -> rbac -> router.
RBAC sits after the transcoder so it always sees `/<pkg>.<Service>/<Method>` and a single
method table (services/common/policy.py, read from the descriptor set) covers REST and gRPC.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from services.common.auth import hs256_jwks
from services.common.policy import MethodPolicy, policies_from_descriptor_set
from services.inference.access import V2_POLICIES, V2_SERVICE

JWT_PROVIDER = "strata"
JWT_FILTER = "envoy.filters.http.jwt_authn"
# Served by every Strata process, not described in strata.pb; public and routed to the first upstream.
INFRA_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MAX_BODY_BYTES = 32 * 1024 * 1024  # 8 MiB artifact chunks grow by a third as base64 inside JSON
# HTTP/2 flow-control windows: the 64 KiB defaults throttle multi-MiB messages to a crawl.
STREAM_WINDOW_BYTES = 16 * 1024 * 1024
CONNECTION_WINDOW_BYTES = 64 * 1024 * 1024
# Unary calls get a generous deadline; streams (artifact downloads, health Watch, reflection) get
# none and are reaped by the connection manager's stream_idle_timeout when they stall instead.
UNARY_TIMEOUT = "120s"
NO_TIMEOUT = "0s"


def _any(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _percent(value: int) -> dict[str, Any]:
    return {"numerator": value, "denominator": "HUNDRED"}


def _http2_options() -> dict[str, Any]:
    return {
        "initial_stream_window_size": STREAM_WINDOW_BYTES,
        "initial_connection_window_size": CONNECTION_WINDOW_BYTES,
    }


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"upstream address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def _http_rules(rule: http_pb2.HttpRule) -> Iterator[tuple[str, str]]:
    """(HTTP method, path template) of a google.api.http rule and its additional bindings."""
    kind = rule.WhichOneof("pattern")
    if kind == "custom":
        yield rule.custom.kind.upper(), rule.custom.path
    elif kind is not None:
        yield kind.upper(), getattr(rule, kind)
    for extra in rule.additional_bindings:
        yield from _http_rules(extra)


def template_regex(template: str) -> str:
    """RE2 regex for the request paths a google.api.http path template matches."""
    verb = ""
    head, sep, tail = template.rpartition(":")
    if sep and "/" not in tail and "}" not in tail:  # ":verb" after the last segment
        template, verb = head, tail
    # A variable stands for its own sub-pattern ("{name}" is "{name=*}").
    template = re.sub(r"\{[^}=]+(?:=([^}]*))?\}", lambda m: m.group(1) or "*", template)
    parts = []
    for segment in template.strip("/").split("/"):
        if segment == "**":
            parts.append("(?:/.*)?")  # zero or more segments
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + re.escape(segment))
    return "".join(parts) + (re.escape(":" + verb) if verb else "")


def _load(descriptor_path: Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(Path(descriptor_path).read_bytes())


def _served_files(
    fds: descriptor_pb2.FileDescriptorSet, upstreams: dict[str, str]
) -> list[descriptor_pb2.FileDescriptorProto]:
    files = [
        f
        for f in fds.file
        if f.package.startswith("strata.") and f.service and f.package.split(".")[1] in upstreams
    ]
    missing = set(upstreams) - {f.package.split(".")[1] for f in files}
    if missing:
        # A typo here would silently leave a service unreachable; fail loudly instead.
        raise ValueError(f"no strata.<key> service in the descriptor set for upstream(s) {sorted(missing)}")
    return files


def _routes(
    files: list[descriptor_pb2.FileDescriptorProto], upstreams: dict[str, str]
) -> list[dict[str, Any]]:
    # grpc-timeout from native gRPC clients replaces the route timeout (0s: not capped).
    def action(cluster: str, timeout: str) -> dict[str, Any]:
        return {
            "cluster": cluster,
            "timeout": timeout,
            "max_stream_duration": {"grpc_timeout_header_max": "0s"},
        }

    streams, packages = [], []
    for f in files:
        key = f.package.split(".")[1]
        packages.append({"match": {"prefix": f"/{f.package}."}, "route": action(key, UNARY_TIMEOUT)})
        for svc in f.service:
            for m in svc.method:
                if m.client_streaming or m.server_streaming:
                    path = f"/{f.package}.{svc.name}/{m.name}"
                    streams.append({"match": {"path": path}, "route": action(key, NO_TIMEOUT)})
    if "inference" in upstreams:  # the KServe V2 protocol, gRPC only (no REST mapping exists)
        packages.append({"match": {"prefix": f"/{V2_SERVICE}/"}, "route": action("inference", UNARY_TIMEOUT)})
    first = next(iter(upstreams))
    infra = [{"match": {"prefix": p}, "route": action(first, NO_TIMEOUT)} for p in INFRA_PREFIXES]
    return streams + packages + infra


def _public_rest_rules(
    files: list[descriptor_pb2.FileDescriptorProto], public: set[str]
) -> list[dict[str, Any]]:
    """jwt_authn runs before the transcoder, so a public method's REST bindings need rules too."""
    rules = []
    for f in files:
        for svc in f.service:
            for m in svc.method:
                if f"/{f.package}.{svc.name}/{m.name}" not in public:
                    continue
                for verb, template in _http_rules(m.options.Extensions[annotations_pb2.http]):
                    rules.append(
                        {
                            "match": {
                                "safe_regex": {"regex": template_regex(template)},
                                "headers": [{"name": ":method", "string_match": {"exact": verb}}],
                            }
                        }
                    )
    return rules


def _jwks(jwt_secret: str | None, jwks_json: str | None) -> str:
    if jwks_json is not None and jwt_secret is None:
        return jwks_json
    if jwt_secret is not None and jwks_json is None:
        return hs256_jwks(jwt_secret)
    raise ValueError("auth needs exactly one of jwt_secret (HS256) or jwks_json")


def _jwt_filter(
    jwks: str, issuer: str, audience: str, public: set[str], public_rest: list[dict[str, Any]]
) -> dict[str, Any]:
    # A rule without `requires` skips verification; the first matching rule wins and a request
    # matching no rule is not verified at all, hence the mandatory catch-all at the end.
    open_rules = [{"match": {"prefix": p}} for p in INFRA_PREFIXES]
    open_rules += [{"match": {"path": p}} for p in sorted(public)] + public_rest
    return {
        "name": JWT_FILTER,
        "typed_config": _any(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers={
                JWT_PROVIDER: {
                    "issuer": issuer,
                    "audiences": [audience],
                    "local_jwks": {"inline_string": jwks},
                    # Header only: the default `access_token` query parameter would leak tokens into
                    # logs and trip the transcoder's unknown-query-parameter check.
                    "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
                    "forward": True,  # services verify the token again
                    "payload_in_metadata": "jwt_payload",
                }
            },
            rules=[*open_rules, {"match": {"prefix": "/"}, "requires": {"provider_name": JWT_PROVIDER}}],
        ),
    }


def _rbac_filter(policies: list[MethodPolicy]) -> dict[str, Any]:
    def has_role(role: str) -> dict[str, Any]:
        return {
            "metadata": {
                "filter": JWT_FILTER,
                "path": [{"key": "jwt_payload"}, {"key": "roles"}],
                "value": {"list_match": {"one_of": {"string_match": {"exact": role}}}},
            }
        }

    open_permissions = [{"url_path": {"path": {"prefix": p}}} for p in INFRA_PREFIXES]
    open_permissions += [{"url_path": {"path": {"exact": p.path}}} for p in policies if p.public]
    rbac_policies = {"public": {"permissions": open_permissions, "principals": [{"any": True}]}}
    for p in policies:
        if not p.public:
            rbac_policies[p.path] = {
                "permissions": [{"url_path": {"path": {"exact": p.path}}}],
                "principals": [has_role(r) for r in p.allowed_roles],
            }
    return {
        "name": "envoy.filters.http.rbac",
        # ALLOW: whatever no policy matches (unknown methods included) is denied with 403.
        "typed_config": _any(
            "envoy.extensions.filters.http.rbac.v3.RBAC", rules={"action": "ALLOW", "policies": rbac_policies}
        ),
    }


def render_envoy_config(
    *,
    upstreams: dict[str, str],
    descriptor_path: Path,
    jwt_secret: str | None = None,
    jwks_json: str | None = None,
    issuer: str = "strata",
    audience: str = "strata-api",
    listen_host: str = "0.0.0.0",
    listen_port: int = 8080,
    admin_port: int = 9901,
    rate_limit_per_second: int = 2000,
    auth_enabled: bool = True,
) -> dict[str, Any]:
    """Envoy bootstrap for the gateway; `upstreams` maps a service key ("registry") to host:port."""
    if not upstreams:
        raise ValueError("at least one upstream is needed")
    fds = _load(descriptor_path)
    files = _served_files(fds, upstreams)
    services = [f"{f.package}.{s.name}" for f in files for s in f.service]

    filters: list[dict[str, Any]] = [
        {
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": _any(
                "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                stat_prefix="gateway_rate_limit",
                token_bucket={
                    "max_tokens": rate_limit_per_second,
                    "tokens_per_fill": rate_limit_per_second,
                    "fill_interval": "1s",
                },
                # Both default to 0 %, which would make the filter a no-op.
                filter_enabled={"runtime_key": "gateway_rate_limit_enabled", "default_value": _percent(100)},
                filter_enforced={
                    "runtime_key": "gateway_rate_limit_enforced",
                    "default_value": _percent(100),
                },
                rate_limited_as_resource_exhausted=True,
            ),
        }
    ]
    transcoder = {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": _any(
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            proto_descriptor=str(Path(descriptor_path).resolve()),  # Envoy may run from another cwd
            services=services,
            print_options={"preserve_proto_field_names": True, "always_print_primitive_fields": True},
            # Failed calls carry code and message as a JSON body instead of an empty one.
            convert_grpc_status=True,
            # Without these, unmapped requests pass through untranscoded and surface as 503s.
            request_validation_options={
                "reject_unknown_method": True,
                "reject_unknown_query_parameters": True,
            },
            max_request_body_size=MAX_BODY_BYTES,
            max_response_body_size=MAX_BODY_BYTES,
        ),
    }
    if auth_enabled:
        # Only methods of served services; the rest stays denied by RBAC's default.
        table = policies_from_descriptor_set(fds).values()
        policies = [p for p in table if p.path[1:].rsplit("/", 1)[0] in services]
        if "inference" in upstreams:
            policies += V2_POLICIES.values()
        public = {p.path for p in policies if p.public}
        jwks = _jwks(jwt_secret, jwks_json)
        filters += [
            _jwt_filter(jwks, issuer, audience, public, _public_rest_rules(files, public)),
            transcoder,
            _rbac_filter(policies),
        ]
    else:
        filters.append(transcoder)
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
        }
    )

    connection_manager = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="gateway",
        codec_type="AUTO",
        http2_protocol_options=_http2_options(),
        # Path-prefix exemptions (health, reflection) must not be reachable through "..", "//".
        normalize_path=True,
        merge_slashes=True,
        route_config={
            "name": "strata",
            "virtual_hosts": [{"name": "strata", "domains": ["*"], "routes": _routes(files, upstreams)}],
        },
        http_filters=filters,
        access_log=[
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": _any("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"),
            }
        ],
    )
    clusters = []
    for key, address in upstreams.items():
        host, port = _split_host_port(address)
        clusters.append(
            {
                "name": key,
                "type": "STRICT_DNS",
                "dns_lookup_family": "V4_PREFERRED",
                "connect_timeout": "2s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        explicit_http_config={"http2_protocol_options": _http2_options()},
                    )
                },
                "load_assignment": {
                    "cluster_name": key,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {"socket_address": {"address": host, "port_value": port}}
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": {"socket_address": {"address": listen_host, "port_value": listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": connection_manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }
