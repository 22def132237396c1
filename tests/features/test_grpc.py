"""The feature service as a process (online store on Redis when it runs, else SQLite): definitions,
push and online reads over gRPC, bad input -> the right status code, nothing written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from strata.features.v1 import features_pb2 as pb
from strata.features.v1 import features_pb2_grpc

from tests.features.conftest import F64, service_online_store, user_view_pb
from tests.features.conftest import ipc as _ipc
from tests.processes import free_port, start_service, stop_process


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def addr(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    with service_online_store(home, db=13) as online:
        proc = start_service("features", home, port, {
            "STRATA_AUTH": "disabled", "STRATA_FEATURES_ONLINE_STORE": online,
            # the tests' own files (sources, entity tables, training sets) live in their tmp_path
            "STRATA_FEATURES_OFFLINE_PATHS": str(tmp_path_factory.getbasetemp())})
        try:
            yield f"127.0.0.1:{port}"
        finally:
            stop_process(proc)


@pytest.fixture(scope="module")
def stub(addr: str) -> Iterator[features_pb2_grpc.FeatureServiceStub]:
    with grpc.insecure_channel(addr) as ch:
        yield features_pb2_grpc.FeatureServiceStub(ch)


def test_apply_push_read(stub: features_pb2_grpc.FeatureServiceStub) -> None:
    suffix = os.urandom(3).hex()
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                            value_type=pb.VALUE_TYPE_INT64)))
    view = user_view_pb(name=f"users_{suffix}")
    created = stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))
    assert (created.outcome, created.feature_view.version) == ("CREATED", 1)
    ts = [1_700_000_000_000_000] * 2
    stub.PushFeatures(pb.PushFeaturesRequest(view=view.name, entities={"user_id": pb.EntityColumn(int64_values=[7, 8])},
                                             event_timestamps_us=ts, features=[
        pb.FeatureValues(name="spend_7d", double_values=[1.5, 2.5]),
        pb.FeatureValues(name="orders_7d", int64_values=[1, 2]),
        pb.FeatureValues(name="segment", string_values=["new", "vip"]),
        pb.FeatureValues(name="active", bool_values=[True, False])]))
    resp = stub.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(
        features=[f"{view.name}:spend_7d", f"{view.name}:segment"],
        entities={"user_id": pb.EntityColumn(int64_values=[8, 7, 9])}))
    spend, segment = resp.features
    assert list(spend.double_values)[:2] == [2.5, 1.5]
    assert list(spend.statuses) == [pb.FEATURE_STATUS_PRESENT] * 2 + [pb.FEATURE_STATUS_NOT_FOUND]
    assert list(segment.string_values)[:2] == ["vip", "new"]
    assert resp.view_versions[view.name] == 1
    found = stub.ListFeatureViews(pb.ListFeatureViewsRequest(query=suffix)).feature_views
    assert [v.name for v in found] == [view.name]


@pytest.mark.parametrize("call, code, message", [
    (lambda s: s.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(features=["nope:x"], entities={
        "user_id": pb.EntityColumn(int64_values=[1])})), grpc.StatusCode.NOT_FOUND, "featureViews/nope not found"),
    (lambda s: s.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name="x", entities=["ghost"], features=[pb.Feature(name="a", dtype=F64)]))),
     grpc.StatusCode.NOT_FOUND, "entities/ghost not found"),
    (lambda s: s.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(name="Bad"))),
     grpc.StatusCode.INVALID_ARGUMENT, "feature_view.name"),
    (lambda s: s.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(features=["x"])),
     grpc.StatusCode.INVALID_ARGUMENT, "features[0]: 'x' is not a feature reference"),
])
def test_bad_input_gets_the_right_code(stub: features_pb2_grpc.FeatureServiceStub, call, code, message: str) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        call(stub)
    assert err.value.code() == code
    assert message in err.value.details(), err.value.details()


def test_materialize_streams_progress_and_records_statistics(stub: features_pb2_grpc.FeatureServiceStub,
                                                             tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                            value_type=pb.VALUE_TYPE_INT64)))
    n = 1000
    pq.write_table(pa.table({"user_id": pa.array(range(n), pa.int64()),
                             "score": pa.array([i / n for i in range(n)], pa.float64()),
                             "ts": pa.array([1_700_000_000_000_000] * n, pa.timestamp("us", tz="UTC"))}),
                   tmp_path / "scores.parquet")
    name = f"scores_{os.urandom(3).hex()}"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=name, entities=["user"], features=[pb.Feature(name="score", dtype=F64)],
        source=pb.DataSource(path=str(tmp_path / "scores.parquet"), timestamp_field="ts"))))
    steps = list(stub.Materialize(pb.MaterializeRequest(view=name, end_us=1_750_000_000_000_000)))
    assert steps[-1].done and steps[-1].rows_written == n
    resp = stub.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(features=[f"{name}:score"], entities={
        "user_id": pb.EntityColumn(int64_values=[999, 5])}))
    assert list(resp.features[0].double_values) == [0.999, 0.005]
    stats = stub.GetFeatureStatistics(pb.GetFeatureStatisticsRequest(view=name)).features[0]
    assert (stats.count, stats.min, stats.max) == (n, 0.0, 0.999)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetFeatureStatistics(pb.GetFeatureStatisticsRequest(view=name, version=9))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_apply_materialize_get(addr: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from services.cli import main
    pq.write_table(pa.table({"store_id": pa.array(["s1", "s2"]), "sales": pa.array([3.5, 7.0]),
                             "ts": pa.array([1_700_000_000_000_000] * 2, pa.timestamp("us", tz="UTC"))}),
                   tmp_path / "stores.parquet")
    name = f"stores_{os.urandom(3).hex()}"
    spec = tmp_path / "defs.yaml"
    spec.write_text(f"""
entities:
  - {{name: store, join_key: store_id, value_type: STRING}}
feature_views:
  - name: {name}
    entities: [store]
    source: {{path: {tmp_path / 'stores.parquet'}, timestamp_field: ts}}
    features:
      - {{name: sales, dtype: FLOAT64, validation: {{min: 0}}}}
""")
    cli = ["--features-addr", addr]
    assert main([*cli, "features", "apply", str(spec)]) == 0
    assert f"feature view {name}: CREATED (version 1)" in capsys.readouterr().out
    assert main([*cli, "features", "materialize", name, "--end", "2026-01-01T00:00:00+00:00"]) == 0
    captured = capsys.readouterr()
    assert "2 rows materialized" in captured.out and "2/2 rows" in captured.err
    assert main([*cli, "features", "get", f"{name}:sales", "--entity", "store_id=s2,s1"]) == 0
    assert json.loads(capsys.readouterr().out)["features"][0]["double_values"] == [7.0, 3.5]


def test_training_set_point_in_time_over_grpc(stub: features_pb2_grpc.FeatureServiceStub, home: Path,
                                              tmp_path: Path) -> None:
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    def t(h: int) -> datetime:
        return datetime(2026, 3, 1, h, tzinfo=UTC)
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                            value_type=pb.VALUE_TYPE_INT64)))
    pq.write_table(pa.table({"user_id": pa.array([1, 1, 2], pa.int64()), "spend": pa.array([10.0, 20.0, 5.0]),
                             "ts": pa.array([t(1), t(5), t(2)], pa.timestamp("us", tz="UTC"))}),
                   tmp_path / "spend.parquet")
    name = f"spend_{os.urandom(3).hex()}"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=name, entities=["user"], ttl_seconds=3 * 3600, features=[pb.Feature(name="spend", dtype=F64)],
        source=pb.DataSource(path=str(tmp_path / "spend.parquet"), timestamp_field="ts"))))
    entity = pa.table({"user_id": pa.array([1, 1, 1, 2, 2], pa.int64()),
                       "event_timestamp": pa.array([t(0), t(3), t(6), t(4), t(6)], pa.timestamp("us", tz="UTC"))})
    parts = list(stub.GetHistoricalFeatures(pb.GetHistoricalFeaturesRequest(
        features=[f"{name}:spend"], entity_arrow=_ipc(entity))))
    got = pa.concat_tables(pa.ipc.open_stream(p.arrow_ipc).read_all() for p in parts)
    # before any event -> null; 3h after 10.0 at 1h (ttl 3h: still valid); 6h -> 20.0 (5h);
    # user 2 at 4h -> 5.0 (2h); at 6h the 2h value is 4h old -> past ttl -> null.
    assert got.column(f"{name}__spend").to_pylist() == [None, 10.0, 20.0, 5.0, None]
    ds = stub.CreateTrainingSet(pb.CreateTrainingSetRequest(
        features=[f"{name}:spend"], entity_arrow=_ipc(entity), output_uri=f"training-sets/{name}.parquet")).dataset
    out = home / "artifacts" / "training-sets" / f"{name}.parquet"
    import hashlib
    assert ds.sha256 == hashlib.sha256(out.read_bytes()).hexdigest() and ds.rows == 5
    assert ds.dataset_id == f"ds-{ds.sha256[:16]}" and list(ds.features) == [f"{name}:spend@v1"]


def test_pushed_rows_reach_the_offline_store(stub: features_pb2_grpc.FeatureServiceStub, tmp_path: Path) -> None:
    import pyarrow as pa
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                            value_type=pb.VALUE_TYPE_INT64)))
    name = f"clicks_{os.urandom(3).hex()}"
    source = tmp_path / "clicks"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=name, entities=["user"], features=[pb.Feature(name="clicks", dtype=F64)],
        source=pb.DataSource(path=str(source / "*.parquet"), timestamp_field="ts"))))
    t = 1_767_225_600_000_000
    stub.PushFeatures(pb.PushFeaturesRequest(view=name, entities={"user_id": pb.EntityColumn(int64_values=[1, 2])},
                                             event_timestamps_us=[t, t], features=[pb.FeatureValues(
                                                 name="clicks", double_values=[3.0, 0.0],
                                                 statuses=[pb.FEATURE_STATUS_PRESENT, pb.FEATURE_STATUS_NULL_VALUE])]))
    assert len(list(source.glob("*.parquet"))) == 1 and not list(source.glob("*.tmp"))
    entity = pa.table({"user_id": pa.array([1, 2], pa.int64()),
                       "event_timestamp": pa.array([t + 1, t + 1], pa.timestamp("us", tz="UTC"))})
    parts = list(stub.GetHistoricalFeatures(pb.GetHistoricalFeaturesRequest(
        features=[f"{name}:clicks"], entity_arrow=_ipc(entity))))
    got = pa.concat_tables(pa.ipc.open_stream(p.arrow_ipc).read_all() for p in parts)
    assert got.column(f"{name}__clicks").to_pylist() == [3.0, None]  # training sees what serving saw


def test_cli_training_set(addr: str, stub: features_pb2_grpc.FeatureServiceStub, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from services.cli import main
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                            value_type=pb.VALUE_TYPE_INT64)))
    t = 1_767_225_600_000_000
    us = pa.timestamp("us", tz="UTC")
    pq.write_table(pa.table({"user_id": pa.array([7], pa.int64()), "age": pa.array([41.0]),
                             "ts": pa.array([t], us), "created": pa.array([t + 10], us)}),
                   tmp_path / "ages.parquet")
    name = f"ages_{os.urandom(3).hex()}"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=name, entities=["user"], features=[pb.Feature(name="age", dtype=F64)],
        source=pb.DataSource(path=str(tmp_path / "ages.parquet"), timestamp_field="ts",
                             created_timestamp_field="created"))))
    pq.write_table(pa.table({"user_id": pa.array([7, 7, 7], pa.int64()), "event_timestamp": pa.array(
        [t - 1, t + 1, t + 10], us)}), tmp_path / "rows.parquet")
    out = tmp_path / "train.parquet"
    args = ["--features-addr", addr, "features", "training-set", f"{name}:age", "--entities",
            str(tmp_path / "rows.parquet"), "-o", str(out)]
    assert main(args) == 0
    assert "3 rows" in capsys.readouterr().out
    assert pq.read_table(out).column(f"{name}__age").to_pylist() == [None, 41.0, 41.0]
    # the value was written (created) 10 us after its event: rows before that do not see it
    assert main([*args, "--filter-by-created-timestamp"]) == 0
    assert pq.read_table(out).column(f"{name}__age").to_pylist() == [None, None, 41.0]
    # the same through a feature set applied from YAML
    (tmp_path / "sets.yaml").write_text(f"feature_sets:\n  - name: {name}_model\n    features: ['{name}:age']\n")
    assert main(["--features-addr", addr, "features", "apply", str(tmp_path / "sets.yaml")]) == 0
    assert f"feature set {name}_model: CREATED (1 features)" in capsys.readouterr().out
    assert main(["--features-addr", addr, "features", "training-set", "--feature-set", f"{name}_model",
                 "--entities", str(tmp_path / "rows.parquet"), "-o", str(out)]) == 0
    assert "3 rows, 1 features" in capsys.readouterr().out
    assert pq.read_table(out).column(f"{name}__age").to_pylist() == [None, 41.0, 41.0]


@pytest.mark.parametrize("uri", ["/etc/strata-escape.parquet", "../../escape.parquet", "a/../../b.parquet",
                                 "training-sets/*/../../../../escape.parquet", "{tmp}/*/../../escape.parquet",
                                 "{tmp}/escape.parquet", "x.parquet", "training-sets/%2e%2e/x.parquet"])
def test_training_sets_are_not_written_outside_the_allowed_places(stub: features_pb2_grpc.FeatureServiceStub,
                                                                  tmp_path: Path, uri: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                            value_type=pb.VALUE_TYPE_INT64)))
    pq.write_table(pa.table({"user_id": pa.array([1], pa.int64()), "x": [1.0],
                             "ts": pa.array([1_700_000_000_000_000], pa.timestamp("us", tz="UTC"))}),
                   tmp_path / "x.parquet")
    name = f"x_{os.urandom(3).hex()}"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=name, entities=["user"], features=[pb.Feature(name="x", dtype=F64)],
        source=pb.DataSource(path=str(tmp_path / "x.parquet"), timestamp_field="ts"))))
    entity = pa.table({"user_id": pa.array([1], pa.int64()),
                       "event_timestamp": pa.array([1_800_000_000_000_000], pa.timestamp("us", tz="UTC"))})
    uri = uri.format(tmp=tmp_path)
    before = {str(p) for p in tmp_path.parent.rglob("*")}
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTrainingSet(pb.CreateTrainingSetRequest(
            features=[f"{name}:x"], entity_arrow=_ipc(entity), output_uri=uri))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "output_uri" in err.value.details()
    assert not os.path.exists("/etc/strata-escape.parquet")
    assert {str(p) for p in tmp_path.parent.rglob("*")} == before  # nothing written anywhere
    # A view with a source outside them is refused when applied, naming the field.
    outside = f"y_{os.urandom(3).hex()}"
    with pytest.raises(grpc.RpcError) as err:
        stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
            name=outside, entities=["user"], features=[pb.Feature(name="x", dtype=F64)],
            source=pb.DataSource(path="/etc/*.parquet", timestamp_field="ts"))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "feature_view.source.path: '/etc/*.parquet': may not be read" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.GetFeatureView(pb.GetFeatureViewRequest(name=outside))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was stored


def test_feature_sets_over_grpc(stub: features_pb2_grpc.FeatureServiceStub, tmp_path: Path) -> None:
    """A model's features by name: applied once, then read online and as a training set by that name."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                            value_type=pb.VALUE_TYPE_INT64)))
    t = 1_767_225_600_000_000
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()), "score": pa.array([0.5, 0.7]),
                             "ts": pa.array([t, t], pa.timestamp("us", tz="UTC"))}), tmp_path / "s.parquet")
    view = f"scores_{os.urandom(3).hex()}"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=view, entities=["user"], features=[pb.Feature(name="score", dtype=F64)],
        source=pb.DataSource(path=str(tmp_path / "s.parquet"), timestamp_field="ts"))))
    name = f"model_{os.urandom(3).hex()}"
    r = stub.ApplyFeatureSet(pb.ApplyFeatureSetRequest(feature_set=pb.FeatureSet(name=name, features=[f"{view}:score"])))
    assert r.outcome == "CREATED"
    assert [s.name for s in stub.ListFeatureSets(pb.ListFeatureSetsRequest()).feature_sets].count(name) == 1
    assert list(stub.GetFeatureSet(pb.GetFeatureSetRequest(name=name)).feature_set.features) == [f"{view}:score"]
    stub.PushFeatures(pb.PushFeaturesRequest(view=view, entities={"user_id": pb.EntityColumn(int64_values=[1])},
                                             event_timestamps_us=[t],
                                             features=[pb.FeatureValues(name="score", double_values=[0.9])]))
    entities = {"user_id": pb.EntityColumn(int64_values=[1, 2])}
    got = stub.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(feature_set=name, entities=entities))
    assert [c.name for c in got.features] == [f"{view}:score"]
    assert list(got.features[0].statuses) == [pb.FEATURE_STATUS_PRESENT, pb.FEATURE_STATUS_NOT_FOUND]
    rows = pa.table({"user_id": pa.array([1, 2], pa.int64()),
                     "event_timestamp": pa.array([t + 1, t + 1], pa.timestamp("us", tz="UTC"))})
    parts = list(stub.GetHistoricalFeatures(pb.GetHistoricalFeaturesRequest(feature_set=name, entity_arrow=_ipc(rows))))
    table = pa.concat_tables(pa.ipc.open_stream(p.arrow_ipc).read_all() for p in parts)
    assert table.column(f"{view}__score").to_pylist() == [0.5, 0.7]
    ds = stub.CreateTrainingSet(pb.CreateTrainingSetRequest(
        feature_set=name, entity_arrow=_ipc(rows), output_uri=f"training-sets/{name}.parquet")).dataset
    assert (ds.feature_set, list(ds.features)) == (name, [f"{view}:score@v1"])  # lineage names the set
    for call, request, code in [
        (stub.GetOnlineFeatures, pb.GetOnlineFeaturesRequest(feature_set="nope", entities=entities),
         grpc.StatusCode.NOT_FOUND),
        (stub.GetOnlineFeatures, pb.GetOnlineFeaturesRequest(feature_set=name, features=[f"{view}:score"],
                                                             entities=entities), grpc.StatusCode.INVALID_ARGUMENT),
        (stub.ApplyFeatureSet, pb.ApplyFeatureSetRequest(feature_set=pb.FeatureSet(name=name, features=[f"{view}:x"])),
         grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GetHistoricalFeatures(pb.GetHistoricalFeaturesRequest(feature_set="nope", entity_arrow=_ipc(rows))))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


MIB = 1 << 20


@pytest.mark.parametrize("call", [
    lambda s: s.PushFeatures(pb.PushFeaturesRequest(view="v" * MIB, event_timestamps_us=[1])),
    lambda s: s.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(features=["x" * MIB])),
    lambda s: s.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(features=["v" * MIB + ":f"], entities={
        "user_id": pb.EntityColumn(int64_values=[1])})),
    lambda s: s.GetFeatureView(pb.GetFeatureViewRequest(name="v" * MIB)),
    lambda s: s.ListFeatureViewVersions(pb.ListFeatureViewVersionsRequest(name="v" * MIB)),
    lambda s: s.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(name="v" * MIB))),
    lambda s: s.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="e" * MIB))),
    lambda s: s.ApplyFeatureSet(pb.ApplyFeatureSetRequest(feature_set=pb.FeatureSet(name="s" * MIB))),
    lambda s: s.ApplyFeatureSet(pb.ApplyFeatureSetRequest(feature_set=pb.FeatureSet(
        name="s", features=["v" * MIB + ":f"]))),
    lambda s: s.GetFeatureSet(pb.GetFeatureSetRequest(name="s" * MIB)),
    lambda s: s.GetFeatureStatistics(pb.GetFeatureStatisticsRequest(view="v" * MIB)),
], ids=["push-view", "read-ref", "read-view", "get-view", "versions", "apply-view", "apply-entity", "apply-set",
        "apply-set-ref", "get-set", "statistics"])
def test_huge_input_is_quoted_short_in_the_error(stub: features_pb2_grpc.FeatureServiceStub, call) -> None:  # noqa: ANN001
    # Echoed whole, a 1 MiB name made the status too large to send (RESOURCE_EXHAUSTED here, a 502
    # through the gateway).
    with pytest.raises(grpc.RpcError) as err:
        call(stub)
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), err.value.details()
    assert len(err.value.details()) < 1024 and f"({MIB}" in err.value.details(), err.value.details()


def test_huge_feature_name_in_a_push_is_quoted_short(stub: features_pb2_grpc.FeatureServiceStub) -> None:
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                            value_type=pb.VALUE_TYPE_INT64)))
    view = user_view_pb(name=f"users_{os.urandom(3).hex()}")
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view))
    with pytest.raises(grpc.RpcError) as err:
        stub.PushFeatures(pb.PushFeaturesRequest(
            view=view.name, entities={"user_id": pb.EntityColumn(int64_values=[7])}, event_timestamps_us=[1],
            features=[pb.FeatureValues(name="spend_7d", double_values=[1.5]),
                      pb.FeatureValues(name="orders_7d", int64_values=[1]),
                      pb.FeatureValues(name="segment", string_values=["new"]),
                      pb.FeatureValues(name="active", bool_values=[True]),
                      pb.FeatureValues(name="n" * MIB, double_values=[1.0])]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details()) < 1024 and "has no feature" in err.value.details(), err.value.details()


@pytest.mark.parametrize("field", ["query", "tag", "owner", "entity"])
def test_list_filters_are_bounded(stub: features_pb2_grpc.FeatureServiceStub, field: str) -> None:
    # A 60,000-character filter became a LIKE pattern SQLite refuses: INTERNAL.
    stub.ListFeatureViews(pb.ListFeatureViewsRequest(**{field: "a" * 1000}))
    with pytest.raises(grpc.RpcError) as err:
        stub.ListFeatureViews(pb.ListFeatureViewsRequest(**{field: "a" * 60_000}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: is 60000 characters"), err.value.details()


@pytest.mark.parametrize("version", [-1, 2**31, 2**63 - 1])
def test_view_versions_out_of_range_name_the_field(stub: features_pb2_grpc.FeatureServiceStub, version: int) -> None:
    for call in (lambda: stub.GetFeatureView(pb.GetFeatureViewRequest(name="x", version=version)),
                 lambda: stub.GetFeatureStatistics(pb.GetFeatureStatisticsRequest(view="x", version=version))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith("version: "), err.value.details()


def test_far_future_push_is_invalid_argument_naming_the_row(stub: features_pb2_grpc.FeatureServiceStub) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="merchant", join_key="merchant_id",
                                                            value_type=pb.VALUE_TYPE_STRING)))
    name = f"risk_{os.urandom(3).hex()}"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=name, entities=["merchant"], ttl_seconds=60, features=[pb.Feature(name="rate", dtype=F64)])))
    with pytest.raises(grpc.RpcError) as err:
        stub.PushFeatures(pb.PushFeaturesRequest(
            view=name, entities={"merchant_id": pb.EntityColumn(string_values=["m1", "m2"])},
            event_timestamps_us=[1_700_000_000_000_000, 2**63 - 1],
            features=[pb.FeatureValues(name="rate", double_values=[0.1, 0.2])]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    violation = error_details_pb2.BadRequest()
    status.details[0].Unpack(violation)
    assert violation.field_violations[0].field == "event_timestamps_us[1]"
    resp = stub.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(features=[f"{name}:rate"], entities={
        "merchant_id": pb.EntityColumn(string_values=["m1", "m2"])}))
    assert list(resp.features[0].statuses) == [pb.FEATURE_STATUS_NOT_FOUND] * 2  # nothing written


def test_an_undecodable_read_is_invalid_argument(addr: str) -> None:
    # The serving hot path (raw reads answered as hand-written bytes) decodes its request with
    # the generated class, through the shared wrapper like every other method.
    with grpc.insecure_channel(addr) as ch:
        call = ch.unary_unary("/strata.features.v1.FeatureService/GetOnlineFeatures")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\x0a\x02\xff\xfe")  # features[0]: not UTF-8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("the request does not decode as strata.features.v1.GetOnlineFeaturesRequest")
