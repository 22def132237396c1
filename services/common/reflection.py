"""Server reflection as every Strata process serves it, directly and behind the gateway.

Each process serves `grpc.reflection.v1.ServerReflection` and the older
`grpc.reflection.v1alpha.ServerReflection` (grpcurl 1.8, the one the dev extras install, asks
v1alpha; newer clients ask v1). The two protocols are the same messages under another package
(grpcio-reflection ships only v1alpha), so one servicer answers both: v1 calls are decoded and
encoded with the v1alpha classes, and a v1 file descriptor made from the v1alpha one describes it.

Envoy cannot merge reflection streams from several backends, so the gateway sends every
reflection call to one backend and names, in `GATEWAY_SERVICES_HEADER`, the services it routes
(gateway/config.py sets the header on that route, replacing any a client sent). A call that
carries the header is answered from every Strata contract (the generated modules of protos/, the
files gateway/strata.pb is built from, plus health and reflection): it lists those of the named
services they describe and resolves their symbols. A call without it (a client on a
service's own port) lists the services of this process, from the process's descriptor pool.
The header only changes what is described, never what may be called: any client could read the
same protos from the repository.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from functools import lru_cache
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

GATEWAY_SERVICES_HEADER = "x-strata-gateway-services"
REFLECTION_V1ALPHA = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The contracts the gateway routes (what scripts/genproto.py puts in gateway/strata.pb).
CONTRACT_MODULES = ("strata.registry.v1.registry_pb2", "strata.features.v1.features_pb2",
                    "strata.inference.v1.inference_pb2", "strata.kserve.v2.grpc_service_pb2")


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, made from the v1alpha file it mirrors field for field."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:  # descriptor.proto is proto2: assigning "" would mark the field set
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for m in service.method:
            m.input_type, m.output_type = m.input_type.replace(old, new), m.output_type.replace(old, new)
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    return proto


def _add(pool: descriptor_pool.DescriptorPool, proto: descriptor_pb2.FileDescriptorProto) -> None:
    try:
        pool.FindFileByName(proto.name)
    except KeyError:
        pool.AddSerializedFile(proto.SerializeToString())


def _file_of(module_descriptor: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module_descriptor.CopyToProto(proto)
    return proto


# The process's own pool describes v1 as well, so `describe` of every listed service works.
_add(descriptor_pool.Default(), _v1_file())


def _add_with_dependencies(pool: descriptor_pool.DescriptorPool, fd: Any) -> None:
    """A generated file and its imports, dependencies first, as protoc wrote them (serialized_pb
    keeps json_name, which the transcoder's field names follow)."""
    for dep in fd.dependencies:
        _add_with_dependencies(pool, dep)
    try:
        pool.FindFileByName(fd.name)
    except KeyError:
        pool.AddSerializedFile(fd.serialized_pb)


@lru_cache(maxsize=1)
def gateway_pool() -> descriptor_pool.DescriptorPool:
    """Every contract the gateway routes plus the health and reflection files."""
    pool = descriptor_pool.DescriptorPool()
    for module in CONTRACT_MODULES:
        _add_with_dependencies(pool, importlib.import_module(module).DESCRIPTOR)
    for proto in (_file_of(health_pb2.DESCRIPTOR), _file_of(reflection_pb2.DESCRIPTOR), _v1_file()):
        _add(pool, proto)
    return pool


@lru_cache(maxsize=8)
def _gateway_servicer(listed: str) -> reflection.aio.ReflectionServicer:
    pool = gateway_pool()
    names = []
    for name in (n.strip() for n in listed.split(",")):
        try:
            names.append(pool.FindServiceByName(name).full_name)
        except KeyError:
            continue  # not in the descriptor set: never list what cannot be described
    return reflection.aio.ReflectionServicer(names, pool=pool)


class StrataReflection(reflection.aio.ReflectionServicer):
    """This process's services, or, on a call the gateway routed here, the gateway's."""

    async def ServerReflectionInfo(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        listed = dict(context.invocation_metadata() or ()).get(GATEWAY_SERVICES_HEADER)
        target = self if not isinstance(listed, str) else _gateway_servicer(listed)
        async for response in reflection.aio.ReflectionServicer.ServerReflectionInfo(
            target, request_iterator, context
        ):
            yield response


def add_reflection(server: Any, service_names: Iterable[str]) -> None:
    """Serve reflection v1 and v1alpha on `server` (a grpc.aio.Server or anything with the same
    registration methods) for `service_names` plus health and reflection themselves."""
    servicer = StrataReflection([*service_names, HEALTH, REFLECTION_V1ALPHA, REFLECTION_V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1}),)
    )
