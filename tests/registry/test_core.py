"""The registry's domain logic without gRPC, on SQLite and on PostgreSQL (same suite)."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from services.common.artifacts import LocalArtifactStore
from services.common.audit import AuditLog, AuditRecord
from services.common.db import Database
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.registry import core, tables
from services.registry.app import MIGRATIONS
from services.registry.card import render_model_card
from services.registry.core import Lineage, Model, Registry
from tests.conftest import make_onnx_model


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Registry:
    db = Database(database_url)
    db.migrate(MIGRATIONS)
    yield Registry(db, LocalArtifactStore(tmp_path / "artifacts"))
    db.dispose()


def _ready_version(r: Registry, name: str, data: bytes | None = None, principal: str = "alice") -> core.Version:
    data = data if data is not None else make_onnx_model()
    try:
        r.create_model(Model(name=name), principal)
    except AlreadyExists:
        pass
    v = r.create_version(name, framework="onnx", principal=principal)
    up = r.begin_upload(name, v.version, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        filename="model.onnx", principal=principal)
    r.append_chunk(up.upload_id, 0, data)
    return r.commit_upload(up.upload_id)


def test_create_get_and_search_models(registry: Registry) -> None:
    registry.create_model(Model(name="fraud", description="Card fraud scorer", tags={"team": "risk"}), "alice")
    registry.create_model(Model(name="churn", owner="growth", tags={"team": "growth", "tier": "1"}), "bob")
    registry.create_model(Model(name="ltv"), "bob")
    assert registry.get_model("fraud").owner == "alice"  # defaults to the creator
    assert [m.name for m in registry.list_models(query="FRAUD")[0]] == ["fraud"]
    assert [m.name for m in registry.list_models(query="card")[0]] == ["fraud"]  # description
    assert [m.name for m in registry.list_models(owner="growth")[0]] == ["churn"]
    assert [m.name for m in registry.list_models(tags=["team"])[0]] == ["churn", "fraud"]
    assert [m.name for m in registry.list_models(tags=["team=growth", "tier=1"])[0]] == ["churn"]
    with pytest.raises(AlreadyExists):
        registry.create_model(Model(name="fraud"), "carol")


def test_pagination_walks_every_model_once(registry: Registry) -> None:
    names = [f"m{i:02d}" for i in range(7)]
    for n in names:
        registry.create_model(Model(name=n), "alice")
    seen, token = [], ""
    while True:
        page, token = registry.list_models(size=2, token=token)
        assert len(page) <= 2
        seen += [m.name for m in page]
        if not token:
            break
    assert seen == names


def test_page_token_is_bound_to_its_query(registry: Registry) -> None:
    for n in ("a1", "a2", "a3"):
        registry.create_model(Model(name=n), "alice")
    _, token = registry.list_models(size=1)
    with pytest.raises(InvalidArgument) as e:
        registry.list_models(size=1, token=token, owner="someone")
    assert e.value.field == "page_token"
    with pytest.raises(InvalidArgument) as e:
        registry.list_models(token="garbage!")
    assert e.value.field == "page_token"


def test_request_id_makes_create_idempotent(registry: Registry) -> None:
    first = registry.create_model(Model(name="idem"), "alice", request_id="req-1")
    again = registry.create_model(Model(name="idem"), "alice", request_id="req-1")
    assert again.name == first.name
    v1 = registry.create_version("idem", framework="onnx", principal="alice", request_id="v-req")
    v1b = registry.create_version("idem", framework="onnx", principal="alice", request_id="v-req")
    assert v1.version == v1b.version == 1
    assert registry.get_model("idem").latest_version == 1
    with pytest.raises(InvalidArgument) as e:
        registry.create_version("idem", framework="sklearn", principal="alice", request_id="v-req")
    assert e.value.field == "request_id"


def test_version_numbers_are_monotonic_and_never_reused(registry: Registry) -> None:
    registry.create_model(Model(name="mono"), "alice")
    for _ in range(3):
        registry.create_version("mono", framework="onnx", principal="alice")
    registry.delete_version("mono", 3)
    assert registry.create_version("mono", framework="onnx", principal="alice").version == 4


def test_concurrent_version_creates_get_distinct_numbers(registry: Registry) -> None:
    registry.create_model(Model(name="race"), "alice")
    got: list[int] = []
    lock = threading.Lock()

    def create() -> None:
        for _ in range(3):
            v = registry.create_version("race", framework="onnx", principal="alice").version
            with lock:
                got.append(v)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 25))


@pytest.mark.parametrize(("call", "field"), [
    (lambda r: r.create_model(Model(name="bad name"), "a"), "registered_model.name"),
    (lambda r: r.create_model(Model(name="ok", tags={"bad key!": "v"}), "a"), "registered_model.tags['bad key!']"),
    (lambda r: r.create_version("m", framework="tensorflow-ish", principal="a"), "framework"),
    (lambda r: r.create_version("m", framework="onnx", principal="a",
                                lineage=Lineage(feature_views=["nover"])), "lineage.feature_views[0]"),
    (lambda r: r.set_alias("m", "Latest", 1, "a"), "alias"),
    (lambda r: r.set_alias("m", "v3", 1, "a"), "alias"),
    (lambda r: r.get_version("m", 0), "version"),
    (lambda r: r.list_models(size=-1), "page_size"),
])
def test_invalid_input_names_the_field(registry: Registry, call, field: str) -> None:  # noqa: ANN001
    registry.create_model(Model(name="m"), "a")
    with pytest.raises(InvalidArgument) as e:
        call(registry)
    assert e.value.field == field
    assert e.value.message.startswith(field)


def test_aliases_move_and_report_the_previous_version(registry: Registry) -> None:
    _ready_version(registry, "al")
    _ready_version(registry, "al")
    v, prev = registry.set_alias("al", "challenger", 1, "alice")
    assert (v.aliases, prev) == (["challenger"], 0)
    v, prev = registry.set_alias("al", "challenger", 2, "alice")
    assert (v.version, prev) == (2, 1)
    assert registry.get_by_alias("al", "challenger").version == 2
    assert registry.get_model("al").aliases == {"challenger": 2}
    registry.delete_alias("al", "challenger")
    with pytest.raises(NotFound):
        registry.get_by_alias("al", "challenger")


def test_deleting_an_aliased_version_is_refused_and_deletes_nothing(registry: Registry) -> None:
    v = _ready_version(registry, "keep")
    registry.set_alias("keep", "challenger", 1, "alice")
    with pytest.raises(FailedPrecondition):
        registry.delete_version("keep", 1)
    assert registry.get_version("keep", 1).sha256 == v.sha256
    assert registry.store.exists(v.artifact_key)


def test_protected_alias_needs_a_promotion(registry: Registry) -> None:
    _ready_version(registry, "prot")
    with pytest.raises(FailedPrecondition, match="protected"):
        registry.set_alias("prot", "production", 1, "alice")


def test_upload_commit_extracts_the_onnx_signature(registry: Registry) -> None:
    v = _ready_version(registry, "sig", make_onnx_model(n_inputs=32, n_outputs=2))
    assert v.status == core.STATUS_READY
    assert [(t.name, t.dtype, t.shape) for t in v.signature.inputs] == [("x", "FLOAT32", (-1, 32))]
    assert [(t.name, t.dtype, t.shape) for t in v.signature.outputs] == [("y", "FLOAT32", (-1, 2))]
    chunks = b"".join(registry.read_artifact("sig", 1)[1])
    assert hashlib.sha256(chunks).hexdigest() == v.sha256


def test_wrong_offset_is_refused(registry: Registry) -> None:
    registry.create_model(Model(name="off"), "alice")
    registry.create_version("off", framework="other", principal="alice")
    up = registry.begin_upload("off", 1, size_bytes=10, sha256="0" * 64, filename="m.bin", principal="alice")
    registry.append_chunk(up.upload_id, 0, b"12345")
    with pytest.raises(FailedPrecondition, match="received_bytes 5"):
        registry.append_chunk(up.upload_id, 0, b"12345")
    with pytest.raises(InvalidArgument) as e:
        registry.append_chunk(up.upload_id, 5, b"123456")
    assert e.value.field == "data"
    with pytest.raises(FailedPrecondition, match="5 of 10"):
        registry.commit_upload(up.upload_id)


def _nothing_stored(r: Registry, name: str) -> None:
    v = r.get_version(name, 1)
    assert v.status == core.STATUS_PENDING_UPLOAD and v.sha256 == "" and v.artifact_key == ""
    assert r.store.list_keys("models/") == []
    assert r.store.list_staged() == []


def test_sha256_mismatch_discards_the_upload(registry: Registry) -> None:
    data = make_onnx_model()
    registry.create_model(Model(name="sha"), "alice")
    registry.create_version("sha", framework="onnx", principal="alice")
    up = registry.begin_upload("sha", 1, size_bytes=len(data), sha256=hashlib.sha256(b"other").hexdigest(),
                               filename="model.onnx", principal="alice")
    registry.append_chunk(up.upload_id, 0, data)
    with pytest.raises(InvalidArgument) as e:
        registry.commit_upload(up.upload_id)
    assert e.value.field == "sha256"
    _nothing_stored(registry, "sha")
    with pytest.raises(NotFound):
        registry.get_upload(up.upload_id)


def test_invalid_onnx_is_refused_and_nothing_stored(registry: Registry) -> None:
    data = b"this is not a protobuf model" * 10
    registry.create_model(Model(name="bad-onnx"), "alice")
    registry.create_version("bad-onnx", framework="onnx", principal="alice")
    up = registry.begin_upload("bad-onnx", 1, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               filename="model.onnx", principal="alice")
    registry.append_chunk(up.upload_id, 0, data)
    with pytest.raises(InvalidArgument) as e:
        registry.commit_upload(up.upload_id)
    assert e.value.field == "artifact"
    _nothing_stored(registry, "bad-onnx")


def test_other_frameworks_skip_onnx_validation(registry: Registry) -> None:
    data = b"pickled-model-bytes"
    registry.create_model(Model(name="skl"), "alice")
    registry.create_version("skl", framework="sklearn", principal="alice")
    up = registry.begin_upload("skl", 1, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               filename="model.pkl", principal="alice")
    registry.append_chunk(up.upload_id, 0, data)
    assert registry.commit_upload(up.upload_id).status == core.STATUS_READY


def test_commit_after_restart_rehashes_the_staged_bytes(registry: Registry) -> None:
    data = make_onnx_model(pad_bytes=1 << 20)
    registry.create_model(Model(name="restart"), "alice")
    registry.create_version("restart", framework="onnx", principal="alice")
    up = registry.begin_upload("restart", 1, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               filename="model.onnx", principal="alice")
    half = len(data) // 2
    registry.append_chunk(up.upload_id, 0, data[:half])
    restarted = Registry(registry.db, registry.store)  # no in-memory hash state
    restarted.append_chunk(up.upload_id, half, data[half:])
    assert restarted.commit_upload(up.upload_id).sha256 == hashlib.sha256(data).hexdigest()


def test_recover_cleans_orphans_and_interrupted_commits(registry: Registry) -> None:
    registry.store.stage_part("orphan0001", 0, b"left by a crash")
    data = make_onnx_model()
    registry.create_model(Model(name="rec"), "alice")
    registry.create_version("rec", framework="onnx", principal="alice")
    up = registry.begin_upload("rec", 1, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               filename="model.onnx", principal="alice")
    registry.append_chunk(up.upload_id, 0, data)
    # Simulate a crash between publishing and recording: the object exists, the version does not
    # point at it.
    key = f"models/rec/1/{up.upload_id}/model.onnx"
    from sqlalchemy import update
    with registry.db.session() as s:
        s.execute(update(tables.uploads).where(tables.uploads.c.upload_id == up.upload_id).values(publish_key=key))
    registry.store.publish(up.upload_id, key)
    assert registry.recover(timedelta(minutes=10)) == {"unpublished": 0, "stale_uploads": 0, "orphan_staged": 0}
    counts = registry.recover(timedelta(0))  # a restarted single registry
    assert counts == {"unpublished": 1, "stale_uploads": 0, "orphan_staged": 1}
    _nothing_stored(registry, "rec")
    assert _ready_version(registry, "rec").status == core.STATUS_READY  # a new attempt works


def test_promotion_needs_a_different_approver(registry: Registry) -> None:
    _ready_version(registry, "promo")
    _ready_version(registry, "promo")
    p = registry.request_promotion("promo", 1, "production", "first", "alice")
    with pytest.raises(PermissionDenied, match="self-approval"):
        registry.decide_promotion(p.promotion_id, "alice", approve=True)
    p, v = registry.decide_promotion(p.promotion_id, "bob", approve=True, comment="ok")
    assert p.state == core.PROMOTION_APPROVED and p.decided_by == "bob"
    assert v.stage == core.STAGE_PRODUCTION and v.aliases == ["production"]
    with pytest.raises(FailedPrecondition, match="already decided"):
        registry.decide_promotion(p.promotion_id, "carol", approve=False)
    p2 = registry.request_promotion("promo", 2, "production", "better", "alice")
    registry.decide_promotion(p2.promotion_id, "bob", approve=True)
    assert registry.get_version("promo", 1).stage == core.STAGE_ARCHIVED
    assert registry.get_by_alias("promo", "production").version == 2
    with pytest.raises(AlreadyExists):
        registry.request_promotion("promo", 1, "production", "", "alice")
        registry.request_promotion("promo", 1, "production", "", "alice")


def test_production_stage_only_through_promotion(registry: Registry) -> None:
    _ready_version(registry, "stage")
    assert registry.transition_stage("stage", 1, core.STAGE_STAGING).stage == core.STAGE_STAGING
    with pytest.raises(FailedPrecondition, match="approved promotion"):
        registry.transition_stage("stage", 1, core.STAGE_PRODUCTION)


def test_model_card_carries_signature_metrics_and_lineage(registry: Registry) -> None:
    registry.create_model(Model(name="card", description="Scores cards"), "alice")
    v = registry.create_version("card", framework="onnx", principal="alice", metrics={"auc": 0.93},
                                lineage=Lineage(mlflow_run_id="run-42", feature_views=["txn:3"]))
    data = make_onnx_model()
    up = registry.begin_upload("card", v.version, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               filename="model.onnx", principal="alice")
    registry.append_chunk(up.upload_id, 0, data)
    v = registry.commit_upload(up.upload_id)
    md = render_model_card(registry.get_model("card"), v, [])
    for expected in ("# card — version 1", "Scores cards", "| auc | 0.93 |", "run-42", "txn:3", "`x`", v.sha256):
        assert expected in md


def test_audit_log_filters_by_resource_prefix(registry: Registry) -> None:
    log = AuditLog(registry.db, tables.audit_events)
    for res, who in [("models/a", "alice"), ("models/a/versions/1", "bob"), ("models/b", "alice")]:
        log.record(AuditRecord(principal=who, method="/x/Y", resource=res, request_id="r", outcome="OK"))
    assert [r.resource for r in log.list(resource_prefix="models/a")] == ["models/a/versions/1", "models/a"]
    assert [r.principal for r in log.list(principal="alice")] == ["alice", "alice"]
    newest = log.list(limit=1)[0]
    assert [r.resource for r in log.list(before_id=newest.id)] == ["models/a/versions/1", "models/a"]
