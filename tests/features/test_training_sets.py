"""Writing a training set is a write: developer role, audited, only under training-sets/, never
replacing a file unless asked to and then only the caller's own. Reads stay viewer and write
nothing. A feature-service process with authentication on, over real gRPC."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from strata.features.v1 import features_pb2 as pb
from strata.features.v1 import features_pb2_grpc

from services.common.auth import mint_token
from tests.features.conftest import F64
from tests.features.conftest import ipc as _ipc
from tests.processes import free_port, start_service, stop_process

SECRET = "training-sets-secret-0123456789abcdef"
US = pa.timestamp("us", tz="UTC")
T = 1_767_225_600_000_000


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("features-ts")


@pytest.fixture(scope="module")
def channel(home: Path) -> Iterator[grpc.Channel]:
    port = free_port()
    proc = start_service("features", home, port, {"STRATA_JWT_SECRET": SECRET,
                                                  "STRATA_FEATURES_ONLINE_STORE": str(home / "online.db")})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        stop_process(proc)


def _md(subject: str, *roles: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(SECRET, subject, list(roles))}"),)


@pytest.fixture(scope="module")
def view(channel: grpc.Channel, home: Path) -> str:
    stub = features_pb2_grpc.FeatureServiceStub(channel)
    admin = _md("admin", "admin")
    stub.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                            value_type=pb.VALUE_TYPE_INT64)), metadata=admin)
    src = home / "artifacts" / "sources" / "spend.parquet"
    src.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()), "spend": [1.0, 2.0],
                             "ts": pa.array([T, T], US)}), src)
    name = f"spend_{os.urandom(3).hex()}"
    stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
        name=name, entities=["user"], features=[pb.Feature(name="spend", dtype=F64)],
        source=pb.DataSource(path="sources/spend.parquet", timestamp_field="ts"))), metadata=admin)
    return name


def _request(view: str, uri: str, **kw: object) -> pb.CreateTrainingSetRequest:
    rows = pa.table({"user_id": pa.array([1, 2], pa.int64()), "event_timestamp": pa.array([T + 1, T + 1], US)})
    return pb.CreateTrainingSetRequest(features=[f"{view}:spend"], entity_arrow=_ipc(rows), output_uri=uri, **kw)


def _audit(home: Path, method: str) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(home / "features.db")
    try:
        return db.execute("SELECT principal, resource, outcome FROM audit_events WHERE method = ? ORDER BY rowid",
                          (f"/strata.features.v1.FeatureService/{method}",)).fetchall()
    finally:
        db.close()


def test_a_viewer_cannot_write_a_training_set(channel: grpc.Channel, home: Path, view: str) -> None:
    stub = features_pb2_grpc.FeatureServiceStub(channel)
    uri = f"training-sets/{view}-viewer.parquet"
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTrainingSet(_request(view, uri), metadata=_md("vera", "viewer"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not (home / "artifacts" / uri).exists()
    refused = [(p, r) for p, r, o in _audit(home, "CreateTrainingSet") if o == "PERMISSION_DENIED"]
    assert refused and all(p == "vera" and r.startswith("trainingSets") for p, r in refused)


def test_a_read_names_no_output_and_writes_nothing(channel: grpc.Channel, home: Path, view: str) -> None:
    """An old client's GetHistoricalFeatures with output_uri (field 5, now reserved): the viewer gets
    the rows streamed back and nothing is written (it used to create or replace the file)."""
    rows = pa.table({"user_id": pa.array([1], pa.int64()), "event_timestamp": pa.array([T + 1], US)})
    target = home / "artifacts" / "sources" / "spend.parquet"  # the view's own source
    before = target.read_bytes()
    request = pb.GetHistoricalFeaturesRequest(features=[f"{view}:spend"], entity_arrow=_ipc(rows))
    raw = request.SerializeToString() + b"\x2a" + bytes([len("sources/spend.parquet")]) + b"sources/spend.parquet"
    read = channel.unary_stream("/strata.features.v1.FeatureService/GetHistoricalFeatures",
                                request_serializer=lambda b: b,
                                response_deserializer=pb.GetHistoricalFeaturesResponse.FromString)
    parts = list(read(raw, metadata=_md("vera", "viewer")))
    got = pa.concat_tables(pa.ipc.open_stream(p.arrow_ipc).read_all() for p in parts)
    assert got.column(f"{view}__spend").to_pylist() == [1.0]
    assert target.read_bytes() == before


def test_writes_are_audited_and_never_replace_what_is_not_the_callers(channel: grpc.Channel, home: Path,
                                                                       view: str) -> None:
    stub = features_pb2_grpc.FeatureServiceStub(channel)
    uri = f"training-sets/{view}.parquet"
    dev, other = _md("dana", "developer"), _md("olga", "developer")
    ds = stub.CreateTrainingSet(_request(view, uri), metadata=dev).dataset
    path = home / "artifacts" / uri
    assert ds.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and ds.rows == 2
    assert (ds.uri, ds.created_by, list(ds.features)) == (uri, "dana", [f"{view}:spend@v1"])
    first = path.read_bytes()
    # Not asked to replace it: ALREADY_EXISTS, the file untouched.
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTrainingSet(_request(view, uri), metadata=dev)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "overwrite" in err.value.details()
    # Another principal asking to replace it: PERMISSION_DENIED, the file untouched.
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTrainingSet(_request(view, uri, overwrite=True), metadata=other)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "dana" in err.value.details()
    assert path.read_bytes() == first
    # The writer asking to replace it: replaced.
    rows = pa.table({"user_id": pa.array([2], pa.int64()), "event_timestamp": pa.array([T + 1], US)})
    again = stub.CreateTrainingSet(pb.CreateTrainingSetRequest(features=[f"{view}:spend"], entity_arrow=_ipc(rows),
                                                               output_uri=uri, overwrite=True), metadata=dev).dataset
    assert again.rows == 1 and hashlib.sha256(path.read_bytes()).hexdigest() == again.sha256
    outcomes = [(p, o) for p, r, o in _audit(home, "CreateTrainingSet") if r == f"trainingSets/{uri}"]
    assert outcomes == [("dana", "OK"), ("dana", "ALREADY_EXISTS"), ("olga", "PERMISSION_DENIED"), ("dana", "OK")]


def test_a_file_no_training_set_wrote_is_never_replaced(channel: grpc.Channel, home: Path, view: str) -> None:
    stub = features_pb2_grpc.FeatureServiceStub(channel)
    uri = f"training-sets/{view}-foreign.parquet"
    (home / "artifacts" / uri).write_bytes(b"someone else's")
    for overwrite, code in ((False, grpc.StatusCode.ALREADY_EXISTS), (True, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateTrainingSet(_request(view, uri, overwrite=overwrite), metadata=_md("adam", "admin"))
        assert err.value.code() == code
    assert (home / "artifacts" / uri).read_bytes() == b"someone else's"


@pytest.mark.parametrize("uri", ["sources/spend.parquet", "x.parquet", "training-sets/../sources/spend.parquet",
                                 "training-sets/*/../../sources/spend.parquet", "training-sets/t.csv"])
def test_training_sets_go_under_their_prefix_only(channel: grpc.Channel, home: Path, view: str, uri: str) -> None:
    stub = features_pb2_grpc.FeatureServiceStub(channel)
    before = (home / "artifacts" / "sources" / "spend.parquet").read_bytes()
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTrainingSet(_request(view, uri, overwrite=True), metadata=_md("adam", "admin"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("output_uri: ")
    assert (home / "artifacts" / "sources" / "spend.parquet").read_bytes() == before


def test_a_retry_with_the_same_request_id_answers_the_first_result(channel: grpc.Channel, view: str) -> None:
    stub = features_pb2_grpc.FeatureServiceStub(channel)
    uri, dev = f"training-sets/{view}-retry.parquet", _md("dana", "developer")
    first = stub.CreateTrainingSet(_request(view, uri, request_id=f"r-{view}"), metadata=dev).dataset
    assert stub.CreateTrainingSet(_request(view, uri, request_id=f"r-{view}"), metadata=dev).dataset == first
    with pytest.raises(grpc.RpcError) as err:  # the same id for another request
        stub.CreateTrainingSet(_request(view, uri + "x.parquet", request_id=f"r-{view}"), metadata=dev)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
