"""Render the Envoy bootstrap of the Strata gateway.

One listener takes REST/JSON and native gRPC. Filters, in decode order:
header_to_metadata -> jwt_authn -> local_ratelimit -> buffer -> lua (health routing) ->
grpc_json_transcoder -> rbac -> router (without auth: the same less jwt_authn and rbac).

- header_to_metadata notes the content-type a request arrived with (REST or gRPC), for the
  local replies below.
- jwt_authn refuses a missing or bad token (401) before anything else counts the request, and
  accepts exactly the tokens the services accept (services/common/auth.py): signed, issuer and
  audience, `exp` and `sub` present, no clock skew.
- local_ratelimit keeps one token bucket per verified principal (the token's `sub`), so one
  caller running out leaves everyone else's budget whole; requests without a principal (public
  methods, health, reflection; everything with auth off) share one anonymous bucket.
- buffer caps a REST body at MAX_BODY_BYTES (413): the transcoder converts JSON as it streams and
  would pass any size on. gRPC calls skip it; the services cap their own messages.
- lua reads the service a grpc.health.v1.Health call names (inside the message) into a header, so
  the route table sends the check to the backend that serves that service.
- RBAC sits after the transcoder so it always sees `/<pkg>.<Service>/<Method>` and a single
  method table (services/common/policy.py, read from the descriptor set) covers REST and gRPC.

Envoy's own replies to REST callers (401, 403, 404, 413, 429, bad JSON, no upstream...) carry the
JSON body service errors carry through the transcoder, {"code", "message", "details"}, with the
gRPC code a service would have used; gRPC callers get a gRPC status as before. Reflection from
any grpcurl goes to one backend, which answers for every service the gateway routes
(services/common/reflection.py).

Tracing (`GatewayTracing`, from the services' own settings by default: STRATA_TRACING=otlp and
STRATA_OTLP_ENDPOINT): Envoy's OpenTelemetry tracer starts a trace for each request, or continues
the one an incoming W3C traceparent names, samples STRATA_GATEWAY_TRACE_SAMPLING percent of the
new ones (default 100), exports its spans over OTLP/gRPC to the collector (a cluster of its own)
and sends the request's span context upstream, so the service's server span is its child. Without
it, no tracer is configured and a client's traceparent/tracestate go upstream unchanged.

Dependencies: the gateway imports services/common only, for what the edge and the services must
agree on (the token format, client TLS, the access policy table and the V2 protocol's rules, the
reflection header), and never a service's package: it is built from the descriptor set and the
shared runtime, not from the services (tests/gateway/test_dependencies.py).
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from services.common.auth import hs256_jwks
from services.common.client import ClientTLS
from services.common.kserve_access import V2_POLICIES, V2_SERVICE
from services.common.policy import MethodPolicy, policies_from_descriptor_set
from services.common.reflection import GATEWAY_SERVICES_HEADER, HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA

JWT_PROVIDER = "strata"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "jwt_payload"  # where jwt_authn puts the verified claims (dynamic metadata)
# Served by every Strata process, not described in strata.pb; public. Health checks go to the
# backend of the service they name, reflection to the first upstream (it answers for all).
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."
INFRA_PREFIXES = (HEALTH_PREFIX, REFLECTION_PREFIX)
HEALTH_SERVICE_HEADER = "x-strata-health-service"  # set by HEALTH_ROUTING_LUA, never by clients
LUA_FILTER = "envoy.filters.http.lua"
HEALTH_ROUTING_SCRIPT = "health_routing.lua"
BUFFER_FILTER = "envoy.filters.http.buffer"
GATEWAY_METADATA = "strata.gateway"  # dynamic metadata namespace of the gateway's own facts
# Principals whose buckets Envoy keeps at once (least recently seen dropped first; a dropped
# principal starts again with a full bucket).
MAX_TRACKED_PRINCIPALS = 10_000
MAX_BODY_BYTES = 32 * 1024 * 1024  # 8 MiB artifact chunks grow by a third as base64 inside JSON
# HTTP/2 flow-control windows: the 64 KiB defaults throttle multi-MiB messages to a crawl.
STREAM_WINDOW_BYTES = 16 * 1024 * 1024
CONNECTION_WINDOW_BYTES = 64 * 1024 * 1024
# Unary calls get a generous deadline; streams (artifact downloads, health Watch, reflection) get
# none and are reaped by the connection manager's stream_idle_timeout when they stall instead.
UNARY_TIMEOUT = "120s"
NO_TIMEOUT = "0s"

# HTTP status of Envoy's own replies -> the gRPC code a service would have answered with (the
# transcoder maps the same codes back to these statuses); any other error status gets UNKNOWN.
LOCAL_REPLY_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,  # bad JSON, unknown query parameter
    401: grpc.StatusCode.UNAUTHENTICATED,  # jwt_authn
    403: grpc.StatusCode.PERMISSION_DENIED,  # rbac
    404: grpc.StatusCode.NOT_FOUND,  # no method for the path
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # body over MAX_BODY_BYTES (what gRPC says of a big message)
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,  # rate limited
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,  # no healthy upstream, connection refused
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# A health check names its service in the request message (HealthCheckRequest.service, field 1),
# not in the path. This script (run on health routes only) copies that name into
# HEALTH_SERVICE_HEADER, dropping any such header the client sent; changing a header makes Envoy
# match the route again, and the health route for that service sends it to its backend. A check
# for "" or for a name no route knows goes to the first upstream, as before. Health requests are
# one small message followed by end of stream (Watch too), so reading the whole body is safe.
HEALTH_ROUTING_LUA = r"""
local HEADER = "%s"

local function varint(s, i)
  local value, scale = 0, 1
  while i <= #s do
    local b = s:byte(i)
    i = i + 1
    value = value + (b %% 128) * scale
    if b < 128 then return value, i end
    scale = scale * 128
  end
  return nil, i
end

-- The `service` field of one uncompressed length-prefixed HealthCheckRequest, or nil.
local function service_of(frame)
  if #frame < 5 or frame:byte(1) ~= 0 then return nil end
  local size = ((frame:byte(2) * 256 + frame:byte(3)) * 256 + frame:byte(4)) * 256 + frame:byte(5)
  local msg = frame:sub(6, 5 + size)
  if #msg ~= size then return nil end
  local i, service = 1, ""
  while i <= #msg do
    local key, n
    key, i = varint(msg, i)
    if key == nil then return nil end
    local field, wire = math.floor(key / 8), key %% 8
    if wire == 0 then
      n, i = varint(msg, i)
      if n == nil then return nil end
    elseif wire == 1 then
      i = i + 8
    elseif wire == 5 then
      i = i + 4
    elseif wire == 2 then
      n, i = varint(msg, i)
      if n == nil or i + n - 1 > #msg then return nil end
      if field == 1 then service = msg:sub(i, i + n - 1) end
      i = i + n
    else
      return nil
    end
  end
  if i ~= #msg + 1 then return nil end
  return service
end

function envoy_on_request(handle)
  -- Objects Envoy hands to the script do not outlive a wait (body()): ask for the headers after.
  local body = handle:body()
  local headers = handle:headers()
  if headers:get(HEADER) ~= nil then headers:remove(HEADER) end
  if body == nil then return end
  local service = service_of(body:getBytes(0, body:length()))
  -- Only a plausible service name becomes a header value.
  if service ~= nil and service:match("^[%%w_.]+$") then headers:add(HEADER, service) end
end
""" % HEALTH_SERVICE_HEADER


TRACING_CLUSTER = "opentelemetry_collector"
TRACING_SERVICE_NAME = "strata-gateway"  # as the services' "strata-<name>" (telemetry.setup_tracing)


@dataclass(frozen=True)
class GatewayTracing:
    """Where the gateway sends its spans (an OTLP/gRPC collector, host:port or http(s)://host:port)
    and the percentage of new traces it samples (a traceparent that arrives keeps its decision)."""

    otlp_endpoint: str
    sampling_percent: float = 100.0

    def __post_init__(self) -> None:
        if not 0 <= self.sampling_percent <= 100:
            raise ValueError(f"trace sampling must be a percentage (0-100), got {self.sampling_percent}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayTracing | None:
        """The services' tracing settings, read the way they read them: STRATA_TRACING=otlp turns it
        on, STRATA_OTLP_ENDPOINT (default 127.0.0.1:4317) is the collector; the sampling percentage
        is STRATA_GATEWAY_TRACE_SAMPLING. None when STRATA_TRACING is not otlp ("console" has no
        Envoy counterpart)."""
        env = os.environ if env is None else env
        if env.get("STRATA_TRACING", "none").lower() != "otlp":
            return None
        raw = env.get("STRATA_GATEWAY_TRACE_SAMPLING", "100")
        try:
            percent = float(raw)
        except ValueError:
            raise ValueError(f"STRATA_GATEWAY_TRACE_SAMPLING must be a percentage, got {raw!r}") from None
        return cls(env.get("STRATA_OTLP_ENDPOINT") or "127.0.0.1:4317", percent)


_FROM_ENV: Any = object()  # render_envoy_config's default: GatewayTracing.from_env()


def _tracing_config(tracing: GatewayTracing) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the connection manager's `tracing`, the collector's cluster)."""
    endpoint = tracing.otlp_endpoint
    scheme, sep, rest = endpoint.partition("://")
    secure = sep and scheme.lower() == "https"
    host, port = _split_host_port((rest if sep else endpoint).rstrip("/"))
    http = {
        "random_sampling": {"value": tracing.sampling_percent},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _any(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": TRACING_CLUSTER}, "timeout": "1s"},
                service_name=TRACING_SERVICE_NAME,
            ),
        },
    }
    cluster = _cluster(TRACING_CLUSTER, host, port, upstream_tls_socket(host, ClientTLS()) if secure else None)
    return http, cluster


def _cluster(name: str, host: str, port: int, transport_socket: dict[str, Any] | None) -> dict[str, Any]:
    """An HTTP/2 (gRPC) upstream cluster at host:port."""
    return {
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "2s",
        **({"transport_socket": transport_socket} if transport_socket else {}),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": _http2_options()},
            )
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}
            ],
        },
    }


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


def _services_by_upstream(
    files: list[descriptor_pb2.FileDescriptorProto], upstreams: dict[str, str]
) -> dict[str, list[str]]:
    """The gRPC services each upstream serves: its package's, plus the KServe V2 one for inference."""
    served: dict[str, list[str]] = {key: [] for key in upstreams}
    for f in files:
        served[f.package.split(".")[1]] += [f"{f.package}.{s.name}" for s in f.service]
    if "inference" in served:  # the KServe V2 protocol, gRPC only (no REST mapping exists)
        served["inference"].append(V2_SERVICE)
    return served


def _routes(
    files: list[descriptor_pb2.FileDescriptorProto], upstreams: dict[str, str], served: dict[str, list[str]]
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
    if "inference" in upstreams:
        packages.append({"match": {"prefix": f"/{V2_SERVICE}/"}, "route": action("inference", UNARY_TIMEOUT)})
    first = next(iter(upstreams))

    # Health: the script names the service in a header, then one route per service picks its backend.
    script = _any("envoy.extensions.filters.http.lua.v3.LuaPerRoute", name=HEALTH_ROUTING_SCRIPT)
    routing = {LUA_FILTER: script}
    health = [
        {
            "match": {
                "prefix": HEALTH_PREFIX,
                "headers": [{"name": HEALTH_SERVICE_HEADER, "string_match": {"exact": name}}],
            },
            "route": action(key, NO_TIMEOUT),
            "typed_per_filter_config": routing,
        }
        for key, names in served.items()
        for name in names
    ]
    health.append(
        {
            "match": {"prefix": HEALTH_PREFIX},
            "route": action(first, NO_TIMEOUT),
            "typed_per_filter_config": routing,
        }
    )
    # Reflection: one stream cannot be split across backends, so the first upstream answers, told
    # by this header which services to describe (a client's own value is replaced).
    listed = [name for names in served.values() for name in names]
    listed += [HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA]
    reflection = {
        "match": {"prefix": REFLECTION_PREFIX},
        "route": action(first, NO_TIMEOUT),
        "request_headers_to_add": [
            {
                "header": {"key": GATEWAY_SERVICES_HEADER, "value": ",".join(listed)},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }
    return streams + packages + health + [reflection]


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
                    "payload_in_metadata": JWT_PAYLOAD,
                    # The services' rule (services/common/auth.py): `exp` and `sub` are required
                    # and time is checked without leeway, so Envoy lets through no token they
                    # refuse. `sub` is also the key of the caller's rate-limit bucket.
                    "require_expiration": True,
                    "subjects": {"safe_regex": {"regex": ".+"}},
                    "clock_skew_seconds": 0,
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
                "path": [{"key": JWT_PAYLOAD}, {"key": "roles"}],
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


def upstream_tls_socket(host: str, tls: ClientTLS) -> dict[str, Any]:
    """A cluster's transport_socket when the services speak TLS: the upstream certificate is
    verified against the CA (the system's roots when none is set) and must name `host` (an IP
    SAN for an address, a DNS SAN plus SNI for a name; Envoy checks no name unless told to);
    with a client certificate (STRATA_TLS_CLIENT_CERT_FILE) Envoy presents it, for mTLS. ALPN
    says h2, which gRPC servers expect."""
    system = ssl.get_default_verify_paths()
    ca = tls.ca_file or next((p for p in (system.cafile, system.openssl_cafile) if p and Path(p).is_file()), None)
    if ca is None:
        raise ValueError("TLS to the services needs STRATA_TLS_CA_FILE (no system CA bundle found)")
    try:
        ipaddress.ip_address(host)
        san, sni = {"san_type": "IP_ADDRESS", "matcher": {"exact": host}}, {}
    except ValueError:
        san, sni = {"san_type": "DNS", "matcher": {"exact": host}}, {"sni": host}
    context: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "validation_context": {
            "trusted_ca": {"filename": str(Path(ca).resolve())},
            "match_typed_subject_alt_names": [san],
        },
    }
    if tls.cert_file is not None and tls.key_file is not None:
        context["tls_certificates"] = [{"certificate_chain": {"filename": str(tls.cert_file.resolve())},
                                        "private_key": {"filename": str(tls.key_file.resolve())}}]
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _any("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                             common_tls_context=context, **sni),
    }


def _rate_limit_filter(per_principal: int, anonymous: int) -> dict[str, Any]:
    """A token bucket per verified principal (the `sub` jwt_authn leaves in dynamic metadata; a
    descriptor entry without a value makes Envoy keep one bucket per distinct value). Requests
    without a principal have no descriptor and draw on the filter's own bucket, the anonymous one,
    which principals' requests leave alone."""

    def bucket(per_second: int) -> dict[str, Any]:
        return {"max_tokens": per_second, "tokens_per_fill": per_second, "fill_interval": "1s"}

    subject = {"key": JWT_FILTER, "path": [{"key": JWT_PAYLOAD}, {"key": "sub"}]}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": _any(
            "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            stat_prefix="gateway_rate_limit",
            token_bucket=bucket(anonymous),
            rate_limits=[
                {
                    "actions": [
                        {
                            "metadata": {
                                "descriptor_key": "principal",
                                "metadata_key": subject,
                                "source": "DYNAMIC",
                            }
                        }
                    ]
                }
            ],
            descriptors=[{"entries": [{"key": "principal"}], "token_bucket": bucket(per_principal)}],
            max_dynamic_descriptors=MAX_TRACKED_PRINCIPALS,
            always_consume_default_token_bucket=False,
            # Both default to 0 %, which would make the filter a no-op.
            filter_enabled={"runtime_key": "gateway_rate_limit_enabled", "default_value": _percent(100)},
            filter_enforced={"runtime_key": "gateway_rate_limit_enforced", "default_value": _percent(100)},
            rate_limited_as_resource_exhausted=True,
        ),
    }


def _buffer_filter() -> dict[str, Any]:
    # REST requests reach it before the transcoder has rewritten their path, when no route matches
    # them yet (routes match gRPC paths), so this filter-wide limit applies to them; every route
    # disables it (virtual host config), so gRPC calls, streams included, are never buffered here.
    return {
        "name": BUFFER_FILTER,
        "typed_config": _any(
            "envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=MAX_BODY_BYTES
        ),
    }


def _health_routing_filter() -> dict[str, Any]:
    # No default script: it runs only where a route names it (the health routes).
    return {
        "name": LUA_FILTER,
        "typed_config": _any(
            "envoy.extensions.filters.http.lua.v3.Lua",
            source_codes={HEALTH_ROUTING_SCRIPT: {"inline_string": HEALTH_ROUTING_LUA}},
        ),
    }


def _content_type_filter() -> dict[str, Any]:
    # The request's content-type as it arrived, for _local_reply_config.
    rule = {"metadata_namespace": GATEWAY_METADATA, "key": "content_type", "type": "STRING"}
    return {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": _any(
            "envoy.extensions.filters.http.header_to_metadata.v3.Config",
            request_rules=[{"header": "content-type", "on_header_present": rule}],
        ),
    }


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own replies to REST callers as {"code", "message", "details"} JSON, the shape the
    transcoder gives service errors (convert_grpc_status), with the HTTP status unchanged.

    gRPC callers are left alone (Envoy would put the JSON into grpc-message): a call is gRPC when
    the content-type it arrived with says so, as _content_type_filter recorded it (by the time
    RBAC refuses a REST call, the transcoder has made its headers gRPC ones). The first mapper
    that matches is the only one applied, and that one changes nothing. (The access-log metadata
    filter Envoy uses here ignores MetadataMatcher.invert, hence a mapper instead of a negation.)"""
    grpc_call = {
        "metadata_filter": {
            "matcher": {
                "filter": GATEWAY_METADATA,
                "path": [{"key": "content_type"}],
                "value": {"string_match": {"prefix": "application/grpc"}},
            },
            "match_if_key_not_found": False,  # no content-type (GET): not gRPC
        }
    }

    def status(op: str, value: int) -> dict[str, Any]:
        threshold = {"default_value": value, "runtime_key": f"gateway_reply_{value}"}
        return {"status_code_filter": {"comparison": {"op": op, "value": threshold}}}

    def body(code: grpc.StatusCode) -> dict[str, Any]:
        return {
            "json_format": {"code": code.value[0], "message": "%LOCAL_REPLY_BODY%", "details": []},
            "content_type": "application/json",
        }

    mappers: list[dict[str, Any]] = [{"filter": grpc_call}]
    mappers += [
        {"filter": status("EQ", http), "body_format_override": body(code)}
        for http, code in LOCAL_REPLY_CODES.items()
    ]
    mappers.append({"filter": status("GE", 400), "body_format_override": body(grpc.StatusCode.UNKNOWN)})
    return {"mappers": mappers}


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
    anonymous_rate_limit_per_second: int | None = None,
    auth_enabled: bool = True,
    upstream_tls: ClientTLS | None = None,
    tracing: GatewayTracing | None = _FROM_ENV,
) -> dict[str, Any]:
    """Envoy bootstrap for the gateway; `upstreams` maps a service key ("registry") to host:port.
    `rate_limit_per_second`: each principal's budget; `anonymous_rate_limit_per_second` (default:
    the same): the one budget all requests without a verified principal share (all requests when
    `auth_enabled` is false). `upstream_tls`: the services speak TLS (see `upstream_tls_socket`).
    `tracing`: Envoy's OpenTelemetry tracer (default: `GatewayTracing.from_env()`, the services'
    STRATA_TRACING/STRATA_OTLP_ENDPOINT; None: no tracer)."""
    if not upstreams:
        raise ValueError("at least one upstream is needed")
    if tracing is _FROM_ENV:
        tracing = GatewayTracing.from_env()
    if tracing is not None and TRACING_CLUSTER in upstreams:
        raise ValueError(f"{TRACING_CLUSTER!r} is the tracing collector's cluster, not a service key")
    fds = _load(descriptor_path)
    files = _served_files(fds, upstreams)
    services = [f"{f.package}.{s.name}" for f in files for s in f.service]

    # Behind jwt_authn when there is one, so only verified principals' requests count.
    edge: list[dict[str, Any]] = [
        _rate_limit_filter(rate_limit_per_second, anonymous_rate_limit_per_second or rate_limit_per_second),
        _buffer_filter(),
        _health_routing_filter(),
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
        filters = [
            _content_type_filter(),
            _jwt_filter(jwks, issuer, audience, public, _public_rest_rules(files, public)),
            *edge,
            transcoder,
            _rbac_filter(policies),
        ]
    else:
        filters = [_content_type_filter(), *edge, transcoder]
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
        }
    )
    virtual_host = {
        "name": "strata",
        "domains": ["*"],
        "routes": _routes(files, upstreams, _services_by_upstream(files, upstreams)),
        # Every route is a gRPC one; see _buffer_filter.
        "typed_per_filter_config": {
            BUFFER_FILTER: _any("envoy.extensions.filters.http.buffer.v3.BufferPerRoute", disabled=True)
        },
    }

    connection_manager = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="gateway",
        codec_type="AUTO",
        http2_protocol_options=_http2_options(),
        # Path-prefix exemptions (health, reflection) must not be reachable through "..", "//".
        normalize_path=True,
        merge_slashes=True,
        route_config={"name": "strata", "virtual_hosts": [virtual_host]},
        http_filters=filters,
        local_reply_config=_local_reply_config(),
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
        clusters.append(_cluster(key, host, port, upstream_tls_socket(host, upstream_tls) if upstream_tls else None))
    if tracing is not None:
        connection_manager["tracing"], collector = _tracing_config(tracing)
        clusters.append(collector)
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
