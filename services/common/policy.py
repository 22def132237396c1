"""Access policies declared on RPCs with the `(strata.common.v1.access)` method option.

This is the single source of the role table: the server interceptor enforces it and the
gateway renders Envoy RBAC from it, so the edge and the services cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor, ServiceDescriptor
from strata.common.v1 import options_pb2

# Roles by rank; a principal may call methods whose min_role ranks at or below its best role.
ROLE_NAMES = {
    options_pb2.ROLE_VIEWER: "viewer",
    options_pb2.ROLE_DEVELOPER: "developer",
    options_pb2.ROLE_APPROVER: "approver",
    options_pb2.ROLE_ADMIN: "admin",
}
ROLE_RANK = {name: value for value, name in ROLE_NAMES.items()}


@dataclass(frozen=True)
class MethodPolicy:
    path: str  # "/pkg.Service/Method"
    min_role: int  # options_pb2.Role value; ROLE_UNSPECIFIED = public
    mutates: bool
    #: The name of the resource a call acts on, as a template over the request's fields
    #: ("models/{name}/versions/{version}"): what the audit row names when the servicer has not
    #: named it (a call refused by the role check or by a bad argument). From the method's
    #: `google.api.http` path; declared in code for protocols without one.
    resource: str = ""

    @property
    def public(self) -> bool:
        return self.min_role == options_pb2.ROLE_UNSPECIFIED

    @property
    def allowed_roles(self) -> list[str]:
        """Role names that satisfy this policy (for RBAC rendering)."""
        return [name for value, name in sorted(ROLE_NAMES.items()) if value >= self.min_role]


def rank_of(roles: Iterable[str]) -> int:
    """Best rank among role names; unknown names count for nothing."""
    return max((ROLE_RANK.get(r, 0) for r in roles), default=0)


def policies_for(services: Iterable[ServiceDescriptor]) -> dict[str, MethodPolicy]:
    """Policy per method path. A method without the option is refused at start-up:
    forgetting to declare access must not silently make a method public."""
    table: dict[str, MethodPolicy] = {}
    for svc in services:
        for m in svc.methods:
            path = f"/{svc.full_name}/{m.name}"
            opts = m.GetOptions()
            if not opts.HasExtension(options_pb2.access):
                raise ValueError(f"{path} declares no (strata.common.v1.access) option")
            access = opts.Extensions[options_pb2.access]
            table[path] = MethodPolicy(path, access.min_role, access.mutates, resource_template(m))
    return table


_VERB = re.compile(r":[A-Za-z][A-Za-z0-9]*$")


def resource_template(method: MethodDescriptor) -> str:
    """The resource name template of a method, from its HTTP path (AIP resource names):
    `/v1/models/{name}/versions/{version}:requestPromotion` -> `models/{name}/versions/{version}`.
    A create on a collection (`post: "/v1/endpoints"`, the resource in the body) names the
    created resource by its `name`: `endpoints/{endpoint.name}`. "" when the method has no path."""
    opts = method.GetOptions()
    if not opts.HasExtension(annotations_pb2.http):
        return ""
    rule = opts.Extensions[annotations_pb2.http]
    kind = rule.WhichOneof("pattern")
    if kind is None:
        return ""
    path = rule.custom.path if kind == "custom" else getattr(rule, kind)
    path = re.sub(r"\{([^}=]+)=[^}]*\}", r"{\1}", _VERB.sub("", path))  # {name=models/*} -> {name}
    segments = path.strip("/").split("/")
    if segments and re.fullmatch(r"v\d+\w*", segments[0]):
        segments = segments[1:]
    template = "/".join(segments)
    if segments and "{" not in segments[-1] and rule.body:
        for f in method.input_type.fields:
            if (f.type == FieldDescriptor.TYPE_MESSAGE and not f.is_repeated
                    and "name" in f.message_type.fields_by_name
                    and f.message_type.fields_by_name["name"].type == FieldDescriptor.TYPE_STRING):
                return f"{template}/{{{f.name}.name}}"
    return template


def policies_from_descriptor_set(fds: descriptor_pb2.FileDescriptorSet) -> dict[str, MethodPolicy]:
    """Same table read from a serialized descriptor set (what the gateway is built from)."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    services = []
    for f in fds.file:
        if f.package.startswith("strata."):
            fd = pool.FindFileByName(f.name)
            services += list(fd.services_by_name.values())
    return policies_for(services)
