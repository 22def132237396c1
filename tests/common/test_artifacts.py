"""One suite for every artifact store backend (the "universal suite" pattern): each test
runs against the local directory store and the S3 store.

The S3 backend is tested against moto's S3-compatible server (the `s3_endpoint` fixture in
tests/conftest.py says why).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.common.artifacts import (
    ArtifactNotFound,
    ArtifactStore,
    LocalArtifactStore,
    S3ArtifactStore,
    open_artifact_store,
)

from tests.conftest import S3_ACCESS_KEY as ACCESS_KEY
from tests.conftest import S3_SECRET_KEY as SECRET_KEY


def _bucket() -> str:
    return f"strata-test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    endpoint = request.getfixturevalue("s3_endpoint")
    # A prefix, so the suite also checks that keys are mapped in and out of it.
    return S3ArtifactStore(endpoint, ACCESS_KEY, SECRET_KEY, _bucket(), prefix="tenant-a")


def _read(store: ArtifactStore, key: str, chunk_size: int = 1 << 20) -> bytes:
    return b"".join(store.open_read(key, chunk_size))


# -- the universal suite ---------------------------------------------------------------------


def test_put_open_read_round_trip_in_chunks(store: ArtifactStore) -> None:
    data = os.urandom(10_000)
    store.put("models/fraud/1/model.onnx", data)
    chunks = list(store.open_read("models/fraud/1/model.onnx", chunk_size=4096))
    assert b"".join(chunks) == data
    assert len(chunks) >= 3 and all(0 < len(c) <= 4096 for c in chunks)
    assert store.exists("models/fraud/1/model.onnx")
    assert store.size("models/fraud/1/model.onnx") == 10_000
    store.put("models/fraud/1/model.onnx", b"v2")  # put replaces
    assert _read(store, "models/fraud/1/model.onnx") == b"v2"


def test_put_file_copies_a_local_file(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "train.parquet"
    data = os.urandom(300_000)
    src.write_bytes(data)
    store.put_file("datasets/train.parquet", str(src))
    assert _read(store, "datasets/train.parquet") == data
    assert store.list_keys("datasets/") == ["datasets/train.parquet"]
    with pytest.raises(FileNotFoundError):  # a missing source leaves no object
        store.put_file("datasets/gone.parquet", str(tmp_path / "gone"))
    assert not store.exists("datasets/gone.parquet")


def test_staged_parts_are_invisible_until_publish(store: ArtifactStore) -> None:
    store.stage_part("up1", 0, b"hello ")
    store.stage_part("up1", 1, b"world")
    assert not store.exists("data/greeting.txt")
    assert store.list_keys() == []
    with pytest.raises(ArtifactNotFound):
        store.size("data/greeting.txt")
    store.publish("up1", "data/greeting.txt")
    assert store.exists("data/greeting.txt")
    assert store.list_keys() == ["data/greeting.txt"]


def test_publish_assembles_parts_in_order_and_returns_size(store: ArtifactStore) -> None:
    # Staged out of order, and past part 9 so ordering must be numeric, not lexical.
    for n in [3, 0, 11, 2, 1, 10, 4, 5, 6, 7, 8, 9]:
        store.stage_part("u", n, f"<{n}>".encode())
    expected = b"".join(f"<{n}>".encode() for n in range(12))
    assert b"".join(store.read_staged("u")) == expected
    assert store.publish("u", "a/b.bin") == len(expected)
    assert _read(store, "a/b.bin") == expected
    assert store.size("a/b.bin") == len(expected)
    assert store.list_staged() == []  # staged parts are gone after publish


def test_large_multipart_publish_round_trips_byte_exact(store: ArtifactStore) -> None:
    # 20 MB: more than one 16 MiB upload part on S3, so minio does a real multipart upload.
    data = os.urandom(20_000_000)
    part = 4 << 20
    for i, off in enumerate(range(0, len(data), part)):
        store.stage_part("big", i, data[off : off + part])
    assert store.publish("big", "datasets/big.bin") == len(data)
    digest = hashlib.sha256()
    for chunk in store.open_read("datasets/big.bin"):
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert store.size("datasets/big.bin") == len(data)


def test_restaging_a_part_number_replaces_it(store: ArtifactStore) -> None:
    store.stage_part("u", 0, b"first-try-long")
    store.stage_part("u", 0, b"retry")
    store.stage_part("u", 1, b"!")
    assert [(s.upload_id, s.parts, s.size_bytes) for s in store.list_staged()] == [("u", 2, 6)]
    assert store.publish("u", "k") == 6
    assert _read(store, "k") == b"retry!"


def test_discard_staged_removes_everything(store: ArtifactStore) -> None:
    store.stage_part("u", 0, b"a")
    store.stage_part("u", 1, b"b")
    store.stage_part("other", 0, b"c")
    store.discard_staged("u")
    store.discard_staged("u")  # nothing left: no error
    store.discard_staged("never-staged")
    assert [s.upload_id for s in store.list_staged()] == ["other"]
    with pytest.raises(ArtifactNotFound):
        store.read_staged("u")
    with pytest.raises(ArtifactNotFound):
        store.publish("u", "k")


def test_list_staged_reports_uploads(store: ArtifactStore) -> None:
    assert store.list_staged() == []
    before = datetime.now(UTC) - timedelta(seconds=5)
    store.stage_part("u1", 0, b"12345")
    store.stage_part("u1", 1, b"678")
    store.stage_part("u2", 0, b"x")
    store.put("final/key", b"not staged")
    staged = sorted(store.list_staged(), key=lambda s: s.upload_id)
    assert [(s.upload_id, s.parts, s.size_bytes) for s in staged] == [("u1", 2, 8), ("u2", 1, 1)]
    for s in staged:
        assert s.modified.tzinfo is not None
        assert before <= s.modified <= datetime.now(UTC) + timedelta(seconds=5)


def test_publish_with_no_parts_raises_not_found(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound):
        store.publish("nothing-here", "k")
    assert not store.exists("k")


def test_missing_key_raises_not_found(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound):
        store.open_read("missing/key")
    with pytest.raises(ArtifactNotFound):
        store.size("missing/key")
    assert not store.exists("missing/key")


def test_delete_is_idempotent(store: ArtifactStore) -> None:
    store.put("x/y", b"data")
    store.delete("x/y")
    assert not store.exists("x/y")
    store.delete("x/y")
    store.delete("never/existed")
    assert store.list_keys() == []


def test_list_keys_filters_by_prefix_and_sorts(store: ArtifactStore) -> None:
    for key in ["models/b/1", "models/a/2", "models/a/1", "datasets/d", "modelsx"]:
        store.put(key, b".")
    store.stage_part("u", 0, b"staged")
    assert store.list_keys() == ["datasets/d", "models/a/1", "models/a/2", "models/b/1", "modelsx"]
    assert store.list_keys("models/") == ["models/a/1", "models/a/2", "models/b/1"]
    assert store.list_keys("models") == ["models/a/1", "models/a/2", "models/b/1", "modelsx"]
    assert store.list_keys("models/a") == ["models/a/1", "models/a/2"]
    assert store.list_keys("nope/") == []


@pytest.mark.parametrize(
    "key", ["", "/abs/key", "a/../b", "..", "a//b", "./a", ".staging/u/00000000", "a/.tmp-x"]
)
def test_invalid_keys_raise_value_error(store: ArtifactStore, key: str) -> None:
    for op in (
        lambda: store.put(key, b"x"),
        lambda: store.open_read(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.uri(key),
    ):
        with pytest.raises(ValueError, match="invalid artifact key"):
            op()
    store.stage_part("u", 0, b"x")
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.publish("u", key)
    assert [s.parts for s in store.list_staged()] == [1]  # a rejected publish keeps the parts


def test_invalid_upload_ids_raise_value_error(store: ArtifactStore) -> None:
    for upload_id in ["", "a/b", "..", ".hidden"]:
        with pytest.raises(ValueError, match="invalid upload id"):
            store.stage_part(upload_id, 0, b"x")
    with pytest.raises(ValueError, match="invalid part number"):
        store.stage_part("u", -1, b"x")


# -- backend-specific ------------------------------------------------------------------------


def test_local_crash_during_publish_leaves_no_final_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalArtifactStore(tmp_path)
    store.stage_part("u", 0, b"part-0")
    store.stage_part("u", 1, b"part-1")

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="simulated crash"):
            store.publish("u", "models/m/1/model.bin")
    assert not store.exists("models/m/1/model.bin")
    assert store.list_keys() == []
    # A real crash would not get to clean its temp file up: such leftovers are never listed.
    (tmp_path / "models/m/1/.tmp-leftover").write_bytes(b"partial")
    assert store.list_keys() == []
    # The staged parts survived, so the publish can simply be retried.
    assert [(s.upload_id, s.parts) for s in store.list_staged()] == [("u", 2)]
    assert store.publish("u", "models/m/1/model.bin") == 12
    assert _read(store, "models/m/1/model.bin") == b"part-0part-1"
    assert store.list_keys() == ["models/m/1/model.bin"]


def test_s3_failure_during_publish_leaves_no_final_object(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = S3ArtifactStore(s3_endpoint, ACCESS_KEY, SECRET_KEY, _bucket())
    # Part 0 fills more than one 16 MiB upload part, so the multipart upload has begun (and a
    # part is uploaded) when fetching part 1 fails; minio must abort it, showing nothing.
    store.stage_part("u", 0, os.urandom(17 << 20))
    store.stage_part("u", 1, b"tail")
    real_get = store._client.get_object
    fetched: list[str] = []

    def flaky_get(bucket: str, name: str, *args: object, **kwargs: object) -> object:
        fetched.append(name)
        if name.endswith("/00000001"):
            raise ConnectionError("simulated failure mid-publish")
        return real_get(bucket, name, *args, **kwargs)

    monkeypatch.setattr(store._client, "get_object", flaky_get)
    with pytest.raises(ConnectionError, match="simulated"):
        store.publish("u", "models/m/1/model.bin")
    assert len(fetched) == 2
    assert not store.exists("models/m/1/model.bin")
    assert store.list_keys() == []
    monkeypatch.undo()
    assert [(s.upload_id, s.parts) for s in store.list_staged()] == [("u", 2)]
    assert store.publish("u", "models/m/1/model.bin") == (17 << 20) + 4


def test_factory_parses_urls(
    tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = open_artifact_store(str(tmp_path / "plain"))
    assert isinstance(local, LocalArtifactStore) and local.root == tmp_path / "plain"
    from_uri = open_artifact_store((tmp_path / "uri").as_uri())
    assert isinstance(from_uri, LocalArtifactStore) and from_uri.root == tmp_path / "uri"
    assert from_uri.uri("a/b") == (tmp_path / "uri" / "a" / "b").as_uri()

    monkeypatch.setenv("STRATA_S3_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("STRATA_S3_SECRET_KEY", SECRET_KEY)
    bucket = _bucket()
    s3 = open_artifact_store(f"s3://{bucket}/some/prefix?endpoint={s3_endpoint}&secure=false")
    assert isinstance(s3, S3ArtifactStore)
    assert s3.uri("a/b") == f"s3://{bucket}/some/prefix/a/b"
    s3.put("a/b", b"via factory")
    assert s3.list_keys() == ["a/b"]
    bare = open_artifact_store(f"s3://{bucket}?endpoint={s3_endpoint}")
    assert isinstance(bare, S3ArtifactStore)
    assert bare.list_keys() == ["some/prefix/a/b"]  # same bucket, no prefix

    for bad in [
        "",
        "ftp://host/x",
        "file://otherhost/x",
        "s3://",
        f"s3://{bucket}",  # no endpoint
        f"s3://{bucket}?endpoint={s3_endpoint}&secure=maybe",
        f"s3://{bucket}?endpoint={s3_endpoint}&acess_key=typo",
    ]:
        with pytest.raises(ValueError) as info:
            open_artifact_store(bad)
        assert repr(bad) in str(info.value) or bad == ""

    monkeypatch.delenv("STRATA_S3_SECRET_KEY")
    with pytest.raises(ValueError, match="STRATA_S3_SECRET_KEY"):
        open_artifact_store(f"s3://{bucket}?endpoint={s3_endpoint}")


def test_package_import_does_not_import_minio() -> None:
    code = (
        "import sys, services.common.artifacts as a; a.LocalArtifactStore; "
        "assert 'minio' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
