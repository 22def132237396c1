"""The feature service as serving by entity key reads it (entity_features.FeatureReader), over
gRPC from the serving process's event loop: one GetOnlineFeatures per request in raw form (the
values as little-endian arrays, read with numpy.frombuffer), the feature types of each view
version read once (a version never changes), and feature set defaults re-read at most every
second (they are only needed when a feature is missing). Each call carries the trace context of
the request being served when tracing is on (`client.unary`: a CLIENT span per call)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import grpc
import numpy as np
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as fpb
from strata.features.v1 import features_pb2_grpc

from services.common.client import open_aio_channel, unary
from services.common.errors import FailedPrecondition, StrataError, quote
from services.common.peer import peer_error
from services.inference.entity_features import OnlineColumn, OnlineRead

_FLOATS = {types_pb2.DATA_TYPE_FLOAT32, types_pb2.DATA_TYPE_FLOAT64}
_INTS = {types_pb2.DATA_TYPE_INT32, types_pb2.DATA_TYPE_INT64}
_TIMEOUT = 5.0
DEFAULTS_MAX_AGE = 1.0
#: Connections to the feature service, used in turn: its serving processes share one port and the
#: kernel spreads connections, not calls, over them.
CONNECTIONS = 2


class GrpcFeatureReader:
    def __init__(self, addr: str, token: str | None, connections: int = CONNECTIONS) -> None:
        self.addr, self._token, self._connections = addr, token, connections
        self._channels: list[grpc.aio.Channel] = []
        self._md: tuple[tuple[str, str], ...] = ()
        self._stubs: list[features_pb2_grpc.FeatureServiceStub] = []
        self._turn = 0
        self._types: dict[tuple[str, int], dict[str, int]] = {}  # (view, version) -> feature -> DataType
        self._defaults: dict[str, tuple[float, Mapping[str, float]]] = {}  # set -> (read at, defaults)

    @property
    def _stub(self) -> features_pb2_grpc.FeatureServiceStub:
        """The next connection's stub. Opened on first use, on the serving process's event loop (an
        aio channel belongs to one)."""
        if not self._stubs:
            for _ in range(self._connections):
                channel, self._md = open_aio_channel(self.addr, self._token, own_connection=True)
                self._channels.append(channel)
                self._stubs.append(features_pb2_grpc.FeatureServiceStub(channel))
        self._turn = (self._turn + 1) % len(self._stubs)
        return self._stubs[self._turn]

    async def read(self, features: Sequence[str], keys: Mapping[str, list]) -> OnlineRead:
        entities = {k: fpb.EntityColumn(string_values=v) if isinstance(v[0], str) else fpb.EntityColumn(int64_values=v)
                    for k, v in keys.items()}
        try:
            resp = await unary(self._stub.GetOnlineFeatures,
                               fpb.GetOnlineFeaturesRequest(features=features, entities=entities, raw=True),
                               self._md, _TIMEOUT)
        except grpc.aio.AioRpcError as e:
            raise _error(e, "read the entities' features") from None
        versions = dict(resp.view_versions)
        rows = len(next(iter(keys.values())))
        columns = []
        for fv in resp.features:
            view, _, feature = fv.name.partition(":")
            types = self._types.get((view, versions[view])) or await self._view_types(view, versions[view])
            dtype = types[feature]
            if dtype in _FLOATS:
                values = np.frombuffer(fv.raw_values, "<f8", rows)
            elif dtype in _INTS:
                values = np.frombuffer(fv.raw_values, "<i8", rows)
            elif dtype == types_pb2.DATA_TYPE_BOOL:
                values = np.frombuffer(fv.raw_values, np.uint8, rows).astype(bool)
            else:
                raise FailedPrecondition(f"feature {quote(fv.name)} is {types_pb2.DataType.Name(dtype)}: a model "
                                         "served by entity key reads numbers")
            statuses = np.frombuffer(fv.raw_statuses, np.uint8, rows) if fv.raw_statuses else None
            columns.append(OnlineColumn(values, statuses))
        return OnlineRead(columns, versions)

    async def _view_types(self, view: str, version: int) -> dict[str, int]:
        types = self._types.get((view, version))
        if types is None:
            try:
                resp = await unary(self._stub.GetFeatureView, fpb.GetFeatureViewRequest(name=view, version=version),
                                   self._md, _TIMEOUT)
            except grpc.aio.AioRpcError as e:
                raise _error(e, f"read view {quote(view)} version {version}") from None
            types = self._types[(view, version)] = {f.name: f.dtype for f in resp.feature_view.features}
        return types

    async def defaults(self, feature_set: str) -> Mapping[str, float]:
        held = self._defaults.get(feature_set)
        if held is not None and time.monotonic() - held[0] <= DEFAULTS_MAX_AGE:
            return held[1]
        try:
            resp = await unary(self._stub.GetFeatureSet, fpb.GetFeatureSetRequest(name=feature_set), self._md,
                               _TIMEOUT)
        except grpc.aio.AioRpcError as e:
            raise _error(e, f"read feature set {quote(feature_set)}") from None
        defaults = dict(resp.feature_set.defaults)
        self._defaults[feature_set] = (time.monotonic(), defaults)
        return defaults

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def _error(e: grpc.aio.AioRpcError, doing: str) -> StrataError:
    """The feature service's answer as this service's error: the caller's keys stay the caller's
    fault (INVALID_ARGUMENT on `entities`); a view or set that is gone is a precondition."""
    return peer_error(e, "the feature store", doing, not_found=False,
                      caller_field=lambda field: field if field.startswith("entities") else None)
