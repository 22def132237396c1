"""The feature store as the training runner sees it (datasets.FeatureSource), over gRPC: a
point-in-time training set written by the feature service (CreateTrainingSet, idempotent by the
job's request id, so a resumed job reads the same rows), and the check at submit that a feature
set exists."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from strata.features.v1 import features_pb2 as fpb
from strata.features.v1 import features_pb2_grpc

from services.common.client import open_channel
from services.common.errors import InvalidArgument, Unavailable, quote
from services.training.datasets import BuiltTrainingSet
from services.training.types import DatasetSpec


class GrpcFeatureSource:
    def __init__(self, addr: str, token: str | None) -> None:
        self._raw, channel = open_channel(addr, token)
        self.stub = features_pb2_grpc.FeatureServiceStub(channel)

    def close(self) -> None:
        self._raw.close()

    def check(self, spec: DatasetSpec) -> None:
        if not spec.feature_set:
            return
        try:
            self.stub.GetFeatureSet(fpb.GetFeatureSetRequest(name=spec.feature_set), timeout=10)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise InvalidArgument("spec.dataset.features.feature_set",
                                      f"no feature set {quote(spec.feature_set)}") from None
            raise Unavailable(f"the feature store did not answer: {e.code().name}") from None

    def build_training_set(self, spec: DatasetSpec, output_uri: str, principal: str) -> BuiltTrainingSet:
        try:
            ds = self.stub.CreateTrainingSet(fpb.CreateTrainingSetRequest(
                features=list(spec.features), feature_set=spec.feature_set, entity_uri=spec.entity_table_uri,
                timestamp_column=spec.timestamp_column, output_uri=output_uri,
                request_id=f"training-{output_uri.rsplit('/', 1)[-1]}"[:128]), timeout=600).dataset
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                raise InvalidArgument("spec.dataset.features", f"the feature store refused the training set: "
                                      f"{quote(e.details(), bare=True)}") from None
            raise
        views, columns, refs = set(), [], []
        for ref in ds.features:  # "view:feature@v2"
            name, _, version = ref.rpartition("@v")
            view, _, feature = name.partition(":")
            views.add(f"{view}:{version}")
            columns.append(f"{view}__{feature}")
            refs.append(name)
        return BuiltTrainingSet(uri=ds.uri, feature_views=tuple(sorted(views)), feature_columns=tuple(columns),
                                feature_refs=tuple(refs))


def connect(addr: str, token: str | None) -> Callable[[], GrpcFeatureSource]:
    return lambda: GrpcFeatureSource(addr, token)
