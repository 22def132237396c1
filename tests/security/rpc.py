"""What the security suites know about Strata's RPCs, read from the proto descriptors (never a
hand-written table): every service of the generated `strata.*` modules and the KServe V2 service
(whose rules are declared in code, services/inference/access.py), each method's declared access
policy, which process serves it, and a raw-bytes caller for any of them."""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor

from services.common.kserve_access import V2_POLICIES, V2_SERVICE
from services.common.policy import MethodPolicy, policies_for

#: Services whose proto cannot carry the access option (a fixed external protocol): the process
#: that serves them and their rules, as the service declares them (Service.extra_policies).
EXTRA_SERVICES: dict[str, tuple[str, dict[str, MethodPolicy]]] = {V2_SERVICE: ("inference", V2_POLICIES)}


#: The generated package of the V2 protocol (proto package `inference`), never imported here.
V2_PACKAGE = "strata.kserve."


def generated_modules() -> list:
    """Every generated `*_pb2` module under `strata` (imported: this also fills the default
    descriptor pool). The V2 protocol's modules (`strata.kserve.v2`) are not imported here: in a
    test process that also imports tritonclient, whose copy of the same protocol fills the
    default pool first, they would not load; `v2_pool` reads them apart."""
    pkg = importlib.import_module("strata")
    return [importlib.import_module(info.name) for info in pkgutil.walk_packages(pkg.__path__, "strata.")
            if info.name.endswith("_pb2") and not info.name.startswith(V2_PACKAGE)]


@lru_cache(maxsize=1)
def v2_pool() -> descriptor_pool.DescriptorPool:
    """The V2 protocol's files in a pool of their own, from the gateway's descriptor set (which
    `make lint` keeps equal to protos/)."""
    from tests.processes import ROOT

    pool = descriptor_pool.DescriptorPool()
    fds = descriptor_pb2.FileDescriptorSet.FromString((ROOT / "gateway" / "strata.pb").read_bytes())
    for f in fds.file:
        pool.Add(f)
    return pool


def generated_services() -> list[ServiceDescriptor]:
    """Every service of the generated modules and of the V2 protocol, sorted by full name."""
    out: dict[str, ServiceDescriptor] = {}
    for mod in generated_modules():
        for svc in mod.DESCRIPTOR.services_by_name.values():
            out[svc.full_name] = svc
    v2 = v2_pool().FindServiceByName(V2_SERVICE)
    out[v2.full_name] = v2
    return [out[k] for k in sorted(out)]


def strata_services() -> list[ServiceDescriptor]:
    return [s for s in generated_services() if s.full_name.startswith("strata.")]


def extra_services() -> list[ServiceDescriptor]:
    found = {s.full_name: s for s in generated_services()}
    return [found[name] for name in EXTRA_SERVICES]


def undeclared(services: Iterable[ServiceDescriptor]) -> list[str]:
    """Methods with no declared access rule: a `strata.*` method without the
    `(strata.common.v1.access)` option, a method of an external-protocol service that its
    code-declared table lacks (or a rule for a method the proto does not have), or any method
    of another service (nothing declares its rules)."""
    from strata.common.v1 import options_pb2

    missing = []
    for svc in services:
        paths = {f"/{svc.full_name}/{m.name}" for m in svc.methods}
        if svc.full_name in EXTRA_SERVICES:
            declared = EXTRA_SERVICES[svc.full_name][1]
            missing += [f"{p} (no rule in code)" for p in sorted(paths - declared.keys())]
            missing += [f"{p} (a rule in code for a method the proto lacks)"
                        for p in sorted(declared.keys() - paths)]
        elif svc.full_name.startswith("strata."):
            missing += [f"/{svc.full_name}/{m.name} (no (strata.common.v1.access) option)"
                        for m in svc.methods if not m.GetOptions().HasExtension(options_pb2.access)]
        else:
            missing += [f"{p} (service outside strata.* with no rules declared in code)"
                        for p in sorted(paths)]
    return missing


def process_of(svc: ServiceDescriptor) -> str:
    """The Strata process serving a service: `strata.<name>.v<N>` -> <name>."""
    if svc.full_name in EXTRA_SERVICES:
        return EXTRA_SERVICES[svc.full_name][0]
    parts = svc.full_name.split(".")
    assert parts[0] == "strata" and len(parts) >= 4, svc.full_name
    return parts[1]


@dataclass(frozen=True)
class Rpc:
    service: ServiceDescriptor
    method: MethodDescriptor
    policy: MethodPolicy
    process: str

    @property
    def path(self) -> str:
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def short(self) -> str:
        return f"{self.service.name}/{self.method.name}"

    def request_class(self) -> type:
        return message_class(self.method.input_type)


def message_class(desc: Descriptor) -> type:
    return message_factory.GetMessageClass(desc)


def all_rpcs() -> list[Rpc]:
    """Every RPC of every Strata service with its declared policy: the `(strata.common.v1.access)`
    option through services/common/policy.py (what the servers enforce), and the code-declared
    rules of the external protocols."""
    rpcs = []
    for svc in strata_services():
        table = policies_for([svc])
        rpcs += [Rpc(svc, m, table[f"/{svc.full_name}/{m.name}"], process_of(svc)) for m in svc.methods]
    for svc in extra_services():
        table = EXTRA_SERVICES[svc.full_name][1]
        rpcs += [Rpc(svc, m, table[f"/{svc.full_name}/{m.name}"], process_of(svc)) for m in svc.methods]
    return rpcs


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: int = 0
    seconds: float = 0.0


MAX_STREAMED = 1000  # responses read from a server stream before the call is cancelled


def invoke(channel: grpc.Channel, method: MethodDescriptor, path: str, payload: bytes,
           metadata: Iterable[tuple[str, str]] = (), timeout: float = 30) -> Outcome:
    """Call `path` with `payload` as the (raw, already serialized) request; the call shape is
    the method descriptor's client_streaming/server_streaming. Responses stay raw bytes."""
    md = list(metadata)
    start = time.monotonic()
    n = 0
    try:
        if not method.client_streaming and not method.server_streaming:
            _, call = channel.unary_unary(path).with_call(payload, metadata=md, timeout=timeout)
            return Outcome(call.code(), call.details() or "", 1, time.monotonic() - start)
        if method.client_streaming and not method.server_streaming:
            _, call = channel.stream_unary(path).with_call(iter([payload]), metadata=md, timeout=timeout)
            return Outcome(call.code(), call.details() or "", 1, time.monotonic() - start)
        if method.client_streaming:
            stream = channel.stream_stream(path)(iter([payload]), metadata=md, timeout=timeout)
        else:
            stream = channel.unary_stream(path)(payload, metadata=md, timeout=timeout)
        for _ in stream:
            n += 1
            if n >= MAX_STREAMED:
                stream.cancel()
                return Outcome(grpc.StatusCode.OK, f"cancelled after {n} responses", n,
                               time.monotonic() - start)
        return Outcome(stream.code(), stream.details() or "", n, time.monotonic() - start)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", n, time.monotonic() - start)
