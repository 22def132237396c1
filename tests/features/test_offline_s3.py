"""The feature service with its artifact store on S3 (moto, see tests/conftest.py): view sources,
entity tables and training sets as keys in the bucket, read in place by DuckDB; pushed rows
appended to the S3 source; writes outside the store refused."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from strata.features.v1 import features_pb2 as pb
from strata.features.v1 import features_pb2_grpc

from services.common.artifacts import S3ArtifactStore
from services.common.errors import InvalidArgument
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.features.conftest import F64, service_online_store
from tests.features.conftest import ipc as _ipc
from tests.processes import free_port, start_service, stop_process

PREFIX = "team-a"


def t(h: int) -> datetime:
    return datetime(2026, 3, 1, h, tzinfo=UTC)


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> S3ArtifactStore:
    """The service's artifact store, seen from the test (same bucket and prefix)."""
    return S3ArtifactStore(s3_endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, f"features-{uuid.uuid4().hex[:12]}",
                           prefix=PREFIX)


@pytest.fixture(scope="module")
def stub(bucket: S3ArtifactStore, s3_endpoint: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[features_pb2_grpc.FeatureServiceStub]:
    home = tmp_path_factory.mktemp("features-s3")
    port = free_port()
    with service_online_store(home, db=12) as online:
        proc = start_service("features", home, port, {
            "STRATA_AUTH": "disabled", "STRATA_FEATURES_ONLINE_STORE": online,
            "STRATA_ARTIFACT_STORE": f"s3://{bucket.bucket}/{PREFIX}?endpoint={s3_endpoint}&secure=false",
            "STRATA_S3_ACCESS_KEY": S3_ACCESS_KEY, "STRATA_S3_SECRET_KEY": S3_SECRET_KEY})
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                s = features_pb2_grpc.FeatureServiceStub(ch)
                s.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                                     value_type=pb.VALUE_TYPE_INT64)))
                yield s
        finally:
            stop_process(proc)


def _put_parquet(bucket: S3ArtifactStore, key: str, table: pa.Table, tmp_path: Path) -> None:
    local = tmp_path / key.replace("/", "_")
    pq.write_table(table, local)
    bucket.put_file(key, str(local))


def _view(stub: features_pb2_grpc.FeatureServiceStub, source: str, ttl: int = 0) -> str:
    name = f"spend_{os.urandom(3).hex()}"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=name, entities=["user"], ttl_seconds=ttl, features=[pb.Feature(name="spend", dtype=F64)],
        source=pb.DataSource(path=source, timestamp_field="ts"))))
    return name


def _frame(parts: list[pb.GetHistoricalFeaturesResponse]) -> pa.Table:
    return pa.concat_tables(pa.ipc.open_stream(p.arrow_ipc).read_all() for p in parts)


def test_point_in_time_over_sources_spread_across_s3_objects(
        stub: features_pb2_grpc.FeatureServiceStub, bucket: S3ArtifactStore, tmp_path: Path) -> None:
    src = f"sources/{uuid.uuid4().hex[:8]}"
    ts = pa.timestamp("us", tz="UTC")
    # Two objects; the later object wins an exact tie (same user, same timestamp).
    _put_parquet(bucket, f"{src}/a.parquet", pa.table({
        "user_id": pa.array([1, 1, 2], pa.int64()), "spend": [10.0, 20.0, 5.0],
        "ts": pa.array([t(1), t(5), t(2)], ts)}), tmp_path)
    _put_parquet(bucket, f"{src}/b.parquet", pa.table({
        "user_id": pa.array([2], pa.int64()), "spend": [6.0], "ts": pa.array([t(2)], ts)}), tmp_path)
    name = _view(stub, f"{src}/*.parquet", ttl=3 * 3600)
    entity = pa.table({"user_id": pa.array([1, 1, 1, 2, 2], pa.int64()),
                       "event_timestamp": pa.array([t(0), t(3), t(6), t(4), t(6)], ts)})
    got = _frame(list(stub.GetHistoricalFeatures(pb.GetHistoricalFeaturesRequest(
        features=[f"{name}:spend"], entity_arrow=_ipc(entity)))))
    assert got.column(f"{name}__spend").to_pylist() == [None, 10.0, 20.0, 6.0, None]

    # The entity table from the bucket, the training set written back to it, hashed for lineage.
    _put_parquet(bucket, f"{src}-rows.parquet", entity, tmp_path)
    ds = stub.CreateTrainingSet(pb.CreateTrainingSetRequest(
        features=[f"{name}:spend"], entity_uri=f"{src}-rows.parquet",
        output_uri=f"training-sets/{name}.parquet")).dataset
    written = b"".join(bucket.open_read(f"training-sets/{name}.parquet"))
    assert ds.sha256 == hashlib.sha256(written).hexdigest() and ds.rows == 5
    assert ds.uri == f"training-sets/{name}.parquet"
    back = pq.read_table(pa.BufferReader(written))
    assert back.column(f"{name}__spend").to_pylist() == [None, 10.0, 20.0, 6.0, None]

    # The same bucket by its full s3:// URI.
    full = f"s3://{bucket.bucket}/{PREFIX}/training-sets/{name}-2.parquet"
    stub.CreateTrainingSet(pb.CreateTrainingSetRequest(
        features=[f"{name}:spend"], entity_arrow=_ipc(entity), output_uri=full))
    assert bucket.exists(f"training-sets/{name}-2.parquet")


def test_materialize_from_s3_then_read_online(stub: features_pb2_grpc.FeatureServiceStub,
                                              bucket: S3ArtifactStore, tmp_path: Path) -> None:
    src = f"sources/{uuid.uuid4().hex[:8]}"
    n = 500
    _put_parquet(bucket, f"{src}/part-0.parquet", pa.table({
        "user_id": pa.array(list(range(n)) * 2, pa.int64()), "spend": [float(i) for i in range(2 * n)],
        "ts": pa.array([t(1)] * n + [t(2)] * n, pa.timestamp("us", tz="UTC"))}), tmp_path)
    name = _view(stub, f"{src}/*.parquet")
    steps = list(stub.Materialize(pb.MaterializeRequest(view=name)))  # up to now
    assert steps[-1].done and steps[-1].rows_written == n
    resp = stub.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(features=[f"{name}:spend"], entities={
        "user_id": pb.EntityColumn(int64_values=[0, n - 1])}))
    assert list(resp.features[0].double_values) == [float(n), float(2 * n - 1)]  # the later row of each user


def test_pushed_rows_are_appended_to_the_s3_source_and_compacted(
        stub: features_pb2_grpc.FeatureServiceStub, bucket: S3ArtifactStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_S3_ACCESS_KEY", S3_ACCESS_KEY)
    monkeypatch.setenv("STRATA_S3_SECRET_KEY", S3_SECRET_KEY)
    src = f"sources/{uuid.uuid4().hex[:8]}"
    name = _view(stub, f"{src}/*.parquet")
    stamp = 1_767_225_600_000_000
    stub.PushFeatures(pb.PushFeaturesRequest(
        view=name, entities={"user_id": pb.EntityColumn(int64_values=[1, 2])}, event_timestamps_us=[stamp, stamp],
        features=[pb.FeatureValues(name="spend", double_values=[3.0, 0.0],
                                   statuses=[pb.FEATURE_STATUS_PRESENT, pb.FEATURE_STATUS_NULL_VALUE])]))
    keys = bucket.list_keys(f"{src}/")
    assert len(keys) == 1 and keys[0].startswith(f"{src}/push-") and keys[0].endswith(".parquet")
    from services.features.files import OfflineFiles
    from services.features.offline_append import Compactor
    store = OfflineFiles(f"s3://{bucket.bucket}/{PREFIX}?endpoint={bucket.endpoint}", cache_dir=tmp_path / "cache")
    stub.PushFeatures(pb.PushFeaturesRequest(
        view=name, entities={"user_id": pb.EntityColumn(int64_values=[2])}, event_timestamps_us=[stamp],
        features=[pb.FeatureValues(name="spend", double_values=[7.0])]))  # a later push wins the tie
    assert Compactor(store).compact(store.resolve(f"{src}/")) == 2
    keys = bucket.list_keys(f"{src}/")
    assert len(keys) == 1 and keys[0].endswith(".c.parquet")
    entity = pa.table({"user_id": pa.array([1, 2], pa.int64()),
                       "event_timestamp": pa.array([stamp + 1, stamp + 1], pa.timestamp("us", tz="UTC"))})
    got = _frame(list(stub.GetHistoricalFeatures(pb.GetHistoricalFeaturesRequest(
        features=[f"{name}:spend"], entity_arrow=_ipc(entity)))))
    assert got.column(f"{name}__spend").to_pylist() == [3.0, 7.0]  # training sees what serving saw


@pytest.mark.parametrize("uri, code, message", [
    ("s3://some-other-bucket/x.parquet", grpc.StatusCode.INVALID_ARGUMENT, "output_uri: 's3://some-other-bucket"),
    ("training-sets/x.csv", grpc.StatusCode.INVALID_ARGUMENT, "output_uri: must end with .parquet"),
    ("gs://bucket/x.parquet", grpc.StatusCode.INVALID_ARGUMENT, "output_uri: 'gs://bucket/x.parquet'"),
    ("sources/x.parquet", grpc.StatusCode.INVALID_ARGUMENT, "may not be written"),  # outside training-sets/
])
def test_training_sets_are_written_inside_the_store_only(stub: features_pb2_grpc.FeatureServiceStub,
                                                         bucket: S3ArtifactStore, tmp_path: Path,
                                                         uri: str, code: grpc.StatusCode, message: str) -> None:
    src = f"sources/{uuid.uuid4().hex[:8]}"
    _put_parquet(bucket, f"{src}/a.parquet", pa.table({
        "user_id": pa.array([1], pa.int64()), "spend": [1.0],
        "ts": pa.array([t(1)], pa.timestamp("us", tz="UTC"))}), tmp_path)
    name = _view(stub, f"{src}/*.parquet")
    entity = pa.table({"user_id": pa.array([1], pa.int64()),
                       "event_timestamp": pa.array([t(2)], pa.timestamp("us", tz="UTC"))})
    before = bucket.list_keys()
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTrainingSet(pb.CreateTrainingSetRequest(
            features=[f"{name}:spend"], entity_arrow=_ipc(entity), output_uri=uri))
    assert err.value.code() == code and message in err.value.details(), err.value.details()
    assert bucket.list_keys() == before


def test_missing_entity_table_and_empty_source_are_reported(stub: features_pb2_grpc.FeatureServiceStub,
                                                           bucket: S3ArtifactStore, tmp_path: Path) -> None:
    src = f"sources/{uuid.uuid4().hex[:8]}"
    name = _view(stub, f"{src}/*.parquet")
    entity = pa.table({"user_id": pa.array([1], pa.int64()),
                       "event_timestamp": pa.array([t(2)], pa.timestamp("us", tz="UTC"))})
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GetHistoricalFeatures(pb.GetHistoricalFeaturesRequest(
            features=[f"{name}:spend"], entity_arrow=_ipc(entity))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "matches no file" in err.value.details()
    _put_parquet(bucket, f"{src}/a.parquet", pa.table({
        "user_id": pa.array([1], pa.int64()), "spend": [1.0],
        "ts": pa.array([t(1)], pa.timestamp("us", tz="UTC"))}), tmp_path)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GetHistoricalFeatures(pb.GetHistoricalFeaturesRequest(
            features=[f"{name}:spend"], entity_uri="nowhere/rows.parquet")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nowhere/rows.parquet" in err.value.details()


def test_object_globs_match_as_duckdb_globs_paths() -> None:
    from services.features.files import _glob_regex
    keys = ["src/a.parquet", "src/b.csv", "src/x/c.parquet", "src/x/y/d.parquet", "srcz/e.parquet", "src/f1.parquet"]
    def match(pattern: str) -> list[str]:
        return [k for k in keys if _glob_regex(pattern).match(k)]
    assert match("src/*.parquet") == ["src/a.parquet", "src/f1.parquet"]
    assert match("src/**/*.parquet") == ["src/a.parquet", "src/x/c.parquet", "src/x/y/d.parquet", "src/f1.parquet"]
    assert match("src/**.parquet") == ["src/a.parquet", "src/x/c.parquet", "src/x/y/d.parquet", "src/f1.parquet"]
    assert match("src/?.parquet") == ["src/a.parquet"]
    assert match("src/[!a]*.parquet") == ["src/f1.parquet"]
    assert match("src/a.parquet") == ["src/a.parquet"]


def test_an_unreachable_s3_endpoint_is_unavailable_not_missing(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """When S3 stops answering, listings and existence checks must not pass for "no such file"
    (a listing that fails must not read as an empty one): every path is UNAVAILABLE, naming the store."""
    from services.common.errors import Unavailable
    from services.features.files import OfflineFiles
    from services.features.offline import ViewSpec, historical_features
    from tests.conftest import moto_server

    monkeypatch.setenv("STRATA_S3_ACCESS_KEY", S3_ACCESS_KEY)
    monkeypatch.setenv("STRATA_S3_SECRET_KEY", S3_SECRET_KEY)
    entity = pa.table({"user_id": pa.array([1], pa.int64()),
                       "event_timestamp": pa.array([t(2)], pa.timestamp("us", tz="UTC"))})
    with moto_server() as endpoint:
        files = OfflineFiles(f"s3://down-{uuid.uuid4().hex[:8]}/p?endpoint={endpoint}", cache_dir=tmp_path / "cache")
        _put_parquet(files.store, "src/a.parquet", pa.table({  # type: ignore[arg-type]
            "user_id": pa.array([1], pa.int64()), "spend": [4.0],
            "ts": pa.array([t(1)], pa.timestamp("us", tz="UTC"))}), tmp_path)
        view = ViewSpec("v", ("user_id",), ("spend",), "ts", None, 0, files.source("src/*.parquet", "source.path"))
        got = historical_features(entity, [view], [("v", "spend")])
        assert got.column("v__spend").to_pylist() == [4.0]
    files._reachable_until = 0.0  # forget the last successful check (kept for a second)
    for call in (lambda: files.source("src/*.parquet", "source.path"),
                 lambda: files.read_table("rows.parquet", "entity_uri"),
                 lambda: files.write_parquet(entity, "out/train.parquet", "output_uri")):
        with pytest.raises(Unavailable, match="offline store s3://down-.* unreachable"):
            call()
    # Within the second after a good check, a failed listing or read is still UNAVAILABLE (never "no file").
    files._reachable_until = float("inf")
    for call in (lambda: files.source("src/*.parquet", "source.path"),
                 lambda: files.read_table("src/a.parquet", "entity_uri")):
        with pytest.raises(Unavailable, match="offline store: (listing|reading) s3://down-"):
            call()


def test_s3_sources_are_read_from_local_copies_refreshed_when_the_object_changes(
        s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.features.files import OfflineFiles
    monkeypatch.setenv("STRATA_S3_ACCESS_KEY", S3_ACCESS_KEY)
    monkeypatch.setenv("STRATA_S3_SECRET_KEY", S3_SECRET_KEY)
    files = OfflineFiles(f"s3://cache-{uuid.uuid4().hex[:8]}/p?endpoint={s3_endpoint}", cache_dir=tmp_path / "cache",
                         cache_bytes=1)
    ts = pa.timestamp("us", tz="UTC")
    for name, value in (("b", 2.0), ("a", 1.0)):
        _put_parquet(files.store, f"src/{name}.parquet", pa.table({  # type: ignore[arg-type]
            "user_id": pa.array([1], pa.int64()), "spend": [value], "ts": pa.array([t(1)], ts)}), tmp_path)
    (tmp_path / "v2").mkdir()
    first = files.source("src/*.parquet", "source.path")
    assert [pq.read_table(p).column("spend")[0].as_py() for p in first] == [1.0, 2.0]  # key order: a, b
    assert files.source("src/*.parquet", "source.path") == first  # not downloaded again
    _put_parquet(files.store, "src/a.parquet", pa.table({  # type: ignore[arg-type]
        "user_id": pa.array([1], pa.int64()), "spend": [9.0], "ts": pa.array([t(1)], ts)}), tmp_path / "v2")
    second = files.source("src/*.parquet", "source.path")
    assert pq.read_table(second[0]).column("spend")[0].as_py() == 9.0 and second[1] == first[1]
    # Over the (1-byte) budget, copies not used for ten minutes are evicted; those of the call stay.
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 3  # the old copy of a.parquet is recent
    files._evict(keep=set(second), in_use_seconds=0)
    assert sorted(str(p) for p in (tmp_path / "cache").glob("*.parquet")) == sorted(second)
    with pytest.raises(InvalidArgument, match="source.path: 'src/none/\\*.parquet' matches no file"):
        files.source("src/none/*.parquet", "source.path")
