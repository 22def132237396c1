"""Access policies declared on RPCs with the `(strata.common.v1.access)` method option.

This is the single source of the role table: the server interceptor enforces it and the
gateway renders Envoy RBAC from it, so the edge and the services cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor
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
            table[path] = MethodPolicy(path, access.min_role, access.mutates)
    return table


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
