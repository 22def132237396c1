"""The feature service's lists and creates follow the platform's conventions
(services/common/paging.py, idempotency.py), through gRPC against a real feature service."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from strata.features.v1 import features_pb2 as pb
from strata.features.v1 import features_pb2_grpc

from tests.conventions import check_page_policy, refused_field, two_pages
from tests.features.conftest import F64, ipc, user_view_pb
from tests.processes import free_port, start_service, stop_process


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[features_pb2_grpc.FeatureServiceStub]:
    home: Path = tmp_path_factory.mktemp("features")
    port = free_port()
    proc = start_service("features", home, port, {
        "STRATA_AUTH": "disabled", "STRATA_FEATURES_ONLINE_STORE": f"sqlite:///{home}/online.db",
        "STRATA_FEATURES_OFFLINE_PATHS": str(tmp_path_factory.getbasetemp())})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            s = features_pb2_grpc.FeatureServiceStub(ch)
            s.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                                value_type=pb.VALUE_TYPE_INT64)))
            yield s
    finally:
        stop_process(proc)


def test_entities_page_in_two_pages(stub) -> None:  # noqa: ANN001
    for i in range(6):
        stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name=f"e{os.urandom(3).hex()}_{i}",
                                                                value_type=pb.VALUE_TYPE_STRING)))

    def entities(**kw):  # noqa: ANN003, ANN202
        return stub.ListEntities(pb.ListEntitiesRequest(**kw))
    everything = [e.name for e in entities(page_size=500).entities]
    names, token = two_pages(entities, "entities", lambda e: e.name, (len(everything) + 1) // 2)
    assert names == everything == sorted(everything)
    check_page_policy(entities, "bm90LWEtdG9rZW4")
    # a token of another list (ListFeatureSets has no filters either) is refused
    assert refused_field(lambda: stub.ListFeatureSets(pb.ListFeatureSetsRequest(page_token=token))) == "page_token"


def test_views_versions_and_sets_page_in_two_pages(stub) -> None:  # noqa: ANN001
    owner = f"o{os.urandom(3).hex()}"
    views = [f"v{owner}_{i}" for i in range(5)]
    for v in views:
        stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=user_view_pb(name=v, owner=owner)))

    def list_views(**kw):  # noqa: ANN003, ANN202
        return stub.ListFeatureViews(pb.ListFeatureViewsRequest(**kw))
    names, token = two_pages(list_views, "feature_views", lambda v: v.name, 3, owner=owner)
    assert names == views
    check_page_policy(list_views, token, owner="someone else")

    for ttl in (60, 120):  # two more schemas: three versions
        stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=user_view_pb(name=views[0], owner=owner,
                                                                                   ttl=ttl)))

    def versions(**kw):  # noqa: ANN003, ANN202
        return stub.ListFeatureViewVersions(pb.ListFeatureViewVersionsRequest(**kw))
    numbers, token = two_pages(versions, "feature_views", lambda v: v.version, 2, name=views[0])
    assert numbers == [3, 2, 1]
    check_page_policy(versions, token, name=views[1])

    for v in views:
        stub.ApplyFeatureSet(pb.ApplyFeatureSetRequest(feature_set=pb.FeatureSet(name=f"s{v}", features=[
            f"{v}:spend_7d"])))

    def sets(**kw):  # noqa: ANN003, ANN202
        return stub.ListFeatureSets(pb.ListFeatureSetsRequest(**kw))
    everything = [s.name for s in sets(page_size=500).feature_sets]
    names, token = two_pages(sets, "feature_sets", lambda s: s.name, (len(everything) + 1) // 2)
    assert names == everything and {f"s{v}" for v in views} <= set(names)
    assert refused_field(lambda: stub.ListEntities(pb.ListEntitiesRequest(page_token=token))) == "page_token"


def test_training_set_retry_returns_the_first_result_and_a_reused_id_is_refused(stub, tmp_path: Path) -> None:  # noqa: ANN001
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = [datetime(2026, 3, 1, h, tzinfo=UTC) for h in (1, 2, 3)]
    pq.write_table(pa.table({"user_id": pa.array([1, 2, 1], pa.int64()), "spend": pa.array([1.0, 2.0, 3.0]),
                             "ts": pa.array(t, pa.timestamp("us", tz="UTC"))}), tmp_path / "spend.parquet")
    name = f"spend_{os.urandom(3).hex()}"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=name, entities=["user"], features=[pb.Feature(name="spend", dtype=F64)],
        source=pb.DataSource(path=str(tmp_path / "spend.parquet"), timestamp_field="ts"))))
    entity = ipc(pa.table({"user_id": pa.array([1, 2], pa.int64()),
                           "event_timestamp": pa.array(t[2:] * 2, pa.timestamp("us", tz="UTC"))}))
    req = pb.CreateTrainingSetRequest(features=[f"{name}:spend"], entity_arrow=entity,
                                      output_uri=f"training-sets/{name}.parquet", request_id=f"ts-{name}")
    first = stub.CreateTrainingSet(req).dataset
    assert stub.CreateTrainingSet(req).dataset == first  # not ALREADY_EXISTS: the first result
    other = pb.CreateTrainingSetRequest()
    other.CopyFrom(req)
    other.output_uri = f"training-sets/{name}-other.parquet"
    assert refused_field(lambda: stub.CreateTrainingSet(other)) == "request_id"
    other.request_id = "has space"
    assert refused_field(lambda: stub.CreateTrainingSet(other)) == "request_id"
