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
from services.registry import domain, tables
from services.registry.app import MIGRATIONS
from services.registry.card import render_model_card
from services.registry.domain import Lineage, Model, Registry
from tests.conftest import make_onnx_model


def _ready_version(r: Registry, name: str, data: bytes | None = None, principal: str = "alice") -> domain.Version:
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
    assert registry.get_model("idem").latest_version == 0  # nothing committed yet
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
    assert v.status == domain.STATUS_READY
    assert [(t.name, t.dtype, t.shape) for t in v.signature.inputs] == [("x", "FLOAT32", (-1, 32))]
    assert [(t.name, t.dtype, t.shape) for t in v.signature.outputs] == [("y", "FLOAT32", (-1, 2))]
    chunks = b"".join(registry.read_artifact("sig", 1)[1])
    assert hashlib.sha256(chunks).hexdigest() == v.sha256


def test_per_upload_locks_do_not_outlive_their_uploads(registry: Registry) -> None:
    """A long-running registry sees millions of uploads: the lock table holds only those in use."""
    for i in range(3):
        _ready_version(registry, f"locks-{i}", make_onnx_model())
    assert len(registry.uploads._upload_locks) == 0


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
    """A failed upload leaves no visible version, latest unchanged, no bytes anywhere."""
    with pytest.raises(NotFound):
        r.get_version(name, 1)
    assert r.list_versions(name)[0] == []
    assert r.get_model(name).latest_version == 0
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
    assert registry.commit_upload(up.upload_id).status == domain.STATUS_READY


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


def _pending_upload(r: Registry, name: str, data: bytes, request_id: str = "") -> domain.Upload:
    """A model (created if needed), a new version and an upload holding every byte of `data`."""
    try:
        r.create_model(Model(name=name), "alice")
    except AlreadyExists:
        pass
    v = r.create_version(name, framework="onnx", principal="alice", request_id=request_id)
    up = r.begin_upload(name, v.version, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        filename="model.onnx", principal="alice")
    r.append_chunk(up.upload_id, 0, data)
    return r.get_upload(up.upload_id)


def _mark_publishing(r: Registry, up: domain.Upload) -> str:
    """What a commit writes just before publishing (the crash tests stop the commit there)."""
    from sqlalchemy import update
    key = f"models/{up.name}/{up.version}/{up.upload_id}/{up.filename}"
    with r.db.session() as s:
        s.execute(update(tables.uploads).where(tables.uploads.c.upload_id == up.upload_id).values(publish_key=key))
    return key


def test_a_version_is_invisible_until_its_artifact_commits(registry: Registry) -> None:
    _ready_version(registry, "vis")
    pending = registry.create_version("vis", framework="onnx", principal="alice")
    assert (pending.version, pending.status) == (2, domain.STATUS_PENDING_UPLOAD)  # the creator sees it
    with pytest.raises(NotFound, match="version 2 of model 'vis' not found"):
        registry.get_version("vis", 2)
    assert [v.version for v in registry.list_versions("vis")[0]] == [1]
    assert [v.version for v in registry.list_versions("-")[0]] == [1]
    assert registry.list_versions("vis", status=domain.STATUS_PENDING_UPLOAD)[0] == []
    assert registry.get_model("vis").latest_version == 1
    assert registry.list_models()[0][0].latest_version == 1
    for call in (lambda: registry.set_alias("vis", "challenger", 2, "alice"),
                 lambda: registry.request_promotion("vis", 2, "production", "", "alice"),
                 lambda: registry.update_version("vis", 2, {"description"}, description="x"),
                 lambda: registry.transition_stage("vis", 2, domain.STAGE_STAGING),
                 lambda: registry.read_artifact("vis", 2)):
        with pytest.raises(NotFound):
            call()
    data = make_onnx_model()
    up = registry.begin_upload("vis", 2, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               filename="model.onnx", principal="alice")
    registry.append_chunk(up.upload_id, 0, data)
    assert registry.commit_upload(up.upload_id).status == domain.STATUS_READY
    assert registry.get_version("vis", 2).status == domain.STATUS_READY
    assert [v.version for v in registry.list_versions("vis")[0]] == [2, 1]
    assert registry.get_model("vis").latest_version == 2


@pytest.mark.parametrize("failure", ["bad-onnx", "sha256-mismatch", "aborted"])
def test_a_failed_registration_leaves_no_visible_version_and_latest_unchanged(registry: Registry,
                                                                              failure: str) -> None:
    _ready_version(registry, "atomic")
    v = registry.create_version("atomic", framework="onnx", principal="alice")
    data = b"this is not a protobuf model" * 10 if failure == "bad-onnx" else make_onnx_model()
    declared = hashlib.sha256(b"other" if failure == "sha256-mismatch" else data).hexdigest()
    up = registry.begin_upload("atomic", v.version, size_bytes=len(data), sha256=declared,
                               filename="model.onnx", principal="alice")
    registry.append_chunk(up.upload_id, 0, data)
    if failure == "aborted":
        registry.abort_upload(up.upload_id)
    else:
        with pytest.raises(InvalidArgument):
            registry.commit_upload(up.upload_id)
    with pytest.raises(NotFound):
        registry.get_version("atomic", v.version)
    assert [x.version for x in registry.list_versions("atomic")[0]] == [1]
    assert registry.get_model("atomic").latest_version == 1
    # Numbers stay monotonic and are never reused: the next registration takes 3, not 2.
    assert _ready_version(registry, "atomic").version == 3
    assert registry.get_model("atomic").latest_version == 3


def test_latest_version_is_the_highest_committed_one_left(registry: Registry) -> None:
    for _ in range(3):
        _ready_version(registry, "lat")
    registry.delete_version("lat", 3)
    assert registry.get_model("lat").latest_version == 2  # always a version Get can return
    registry.delete_version("lat", 1)
    assert registry.get_model("lat").latest_version == 2
    assert _ready_version(registry, "lat").version == 4


def test_a_retried_request_id_resumes_a_failed_registration(registry: Registry) -> None:
    registry.create_model(Model(name="retry"), "alice")
    v = registry.create_version("retry", framework="onnx", principal="alice", request_id="reg-1")
    bad = b"not onnx" * 10
    up = registry.begin_upload("retry", v.version, size_bytes=len(bad), sha256=hashlib.sha256(bad).hexdigest(),
                               filename="model.onnx", principal="alice")
    registry.append_chunk(up.upload_id, 0, bad)
    with pytest.raises(InvalidArgument):
        registry.commit_upload(up.upload_id)
    again = registry.create_version("retry", framework="onnx", principal="alice", request_id="reg-1")
    assert (again.version, again.status) == (1, domain.STATUS_PENDING_UPLOAD)  # same draft, no new number
    data = make_onnx_model()
    up = registry.begin_upload("retry", 1, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               filename="model.onnx", principal="alice")
    registry.append_chunk(up.upload_id, 0, data)
    registry.commit_upload(up.upload_id)
    done = registry.create_version("retry", framework="onnx", principal="alice", request_id="reg-1")
    assert (done.version, done.status) == (1, domain.STATUS_READY)
    assert registry.get_model("retry").latest_version == 1


def test_commit_killed_before_publishing_resumes_after_recover(registry: Registry) -> None:
    data = make_onnx_model(pad_bytes=1 << 20)
    up = _pending_upload(registry, "crash-pre", data)
    key = _mark_publishing(registry, up)
    # The publish had started: a temp file beside the key, the staged bytes still whole.
    tmp = registry.store.root / f"models/crash-pre/1/{up.upload_id}/.tmp-interrupted"
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(data[:1000])
    restarted = Registry(registry.db, registry.store)  # no in-memory state
    restarted.recover(timedelta(0))
    assert not tmp.exists()
    assert restarted.get_upload(up.upload_id).received_bytes == len(data)
    v = restarted.commit_upload(up.upload_id)
    assert (v.status, v.artifact_key, v.sha256) == (domain.STATUS_READY, key, hashlib.sha256(data).hexdigest())
    assert restarted.store.list_keys("models/") == [key]
    assert restarted.store.list_staged() == []
    assert restarted.get_model("crash-pre").latest_version == 1


def test_commit_killed_after_publishing_resumes_after_recover(registry: Registry) -> None:
    data = make_onnx_model(n_inputs=8, pad_bytes=1 << 20)
    up = _pending_upload(registry, "crash-post", data)
    key = _mark_publishing(registry, up)
    registry.store.publish(up.upload_id, key)  # published (staged copy gone), not yet recorded
    restarted = Registry(registry.db, registry.store)
    restarted.recover(timedelta(0))
    with pytest.raises(NotFound):
        restarted.get_version("crash-post", 1)  # still invisible until the commit is recorded
    assert restarted.get_upload(up.upload_id).received_bytes == len(data)
    v = restarted.commit_upload(up.upload_id)  # the client re-commits
    assert (v.status, v.artifact_key, v.sha256) == (domain.STATUS_READY, key, hashlib.sha256(data).hexdigest())
    assert [(t.name, t.shape) for t in v.signature.inputs] == [("x", (-1, 8))]
    assert b"".join(restarted.read_artifact("crash-post", 1)[1]) == data
    assert restarted.store.list_keys("models/") == [key]
    with pytest.raises(NotFound):
        restarted.get_upload(up.upload_id)


def test_two_replicas_committing_one_upload_keep_the_winners_artifact(registry: Registry) -> None:
    data = make_onnx_model()
    up = _pending_upload(registry, "race-commit", data)
    other = Registry(registry.db, registry.store)  # another replica: its own upload locks

    class SlowReplicaStore(LocalArtifactStore):
        def publish(self, upload_id: str, key: str) -> int:
            size = super().publish(upload_id, key)
            other.commit_upload(upload_id)  # the other replica records while this one is here
            return size

    slow = Registry(registry.db, SlowReplicaStore(registry.store.root))
    with pytest.raises(FailedPrecondition, match="already has an artifact"):
        slow.commit_upload(up.upload_id)
    v = registry.get_version("race-commit", 1)
    assert b"".join(registry.read_artifact("race-commit", 1)[1]) == data
    assert registry.store.list_keys("models/") == [v.artifact_key]


def test_recover_leaves_uploads_of_other_replicas_alone(registry: Registry) -> None:
    registry.store.stage_part("orphan0001", 0, b"left by a crash")
    up = _pending_upload(registry, "busy", make_onnx_model())
    key = _mark_publishing(registry, up)
    registry.store.publish(up.upload_id, key)
    assert registry.recover(timedelta(minutes=10)) == {"interrupted_commits": 0, "stale_uploads": 0,
                                                       "orphan_staged": 0, "abandoned_versions": 0}
    assert registry.store.list_keys("models/") == [key]
    assert [s.upload_id for s in registry.store.list_staged()] == ["orphan0001"]
    counts = registry.recover(timedelta(0))  # a restarted single registry
    assert counts == {"interrupted_commits": 1, "stale_uploads": 0, "orphan_staged": 1, "abandoned_versions": 0}
    assert registry.commit_upload(up.upload_id).status == domain.STATUS_READY


def test_recover_removes_stale_uploads_and_abandoned_versions(registry: Registry) -> None:
    _ready_version(registry, "stale")
    published = _pending_upload(registry, "stale", make_onnx_model(), request_id="reg-2")
    registry.store.publish(published.upload_id, _mark_publishing(registry, published))
    staged = _pending_upload(registry, "stale", make_onnx_model())
    registry.create_version("stale", framework="onnx", principal="alice")  # never uploaded
    fresh = Registry(registry.db, registry.store, domain.RegistryConfig(stale_upload_after=timedelta(hours=1)))
    assert fresh.recover(timedelta(0)) == {"interrupted_commits": 1, "stale_uploads": 0, "orphan_staged": 0,
                                           "abandoned_versions": 0}
    old = Registry(registry.db, registry.store, domain.RegistryConfig(stale_upload_after=timedelta(0)))
    assert old.recover(timedelta(0)) == {"interrupted_commits": 0, "stale_uploads": 2, "orphan_staged": 0,
                                         "abandoned_versions": 3}
    for upload_id in (published.upload_id, staged.upload_id):
        with pytest.raises(NotFound):
            old.get_upload(upload_id)
    ready = old.get_version("stale", 1)
    assert old.store.list_keys("models/") == [ready.artifact_key]
    assert old.store.list_staged() == []
    assert [v.version for v in old.list_versions("stale")[0]] == [1]
    # The request id of an abandoned registration starts afresh, with a new number.
    assert old.create_version("stale", framework="onnx", principal="alice", request_id="reg-2").version == 5


def test_promotion_needs_a_different_approver(registry: Registry) -> None:
    _ready_version(registry, "promo")
    _ready_version(registry, "promo")
    p = registry.request_promotion("promo", 1, "production", "first", "alice")
    with pytest.raises(PermissionDenied, match="self-approval"):
        registry.decide_promotion(p.promotion_id, "alice", approve=True)
    p, v = registry.decide_promotion(p.promotion_id, "bob", approve=True, comment="ok")
    assert p.state == domain.PROMOTION_APPROVED and p.decided_by == "bob"
    assert v.stage == domain.STAGE_PRODUCTION and v.aliases == ["production"]
    with pytest.raises(FailedPrecondition, match="already decided"):
        registry.decide_promotion(p.promotion_id, "carol", approve=False)
    p2 = registry.request_promotion("promo", 2, "production", "better", "alice")
    registry.decide_promotion(p2.promotion_id, "bob", approve=True)
    assert registry.get_version("promo", 1).stage == domain.STAGE_ARCHIVED
    assert registry.get_by_alias("promo", "production").version == 2
    with pytest.raises(AlreadyExists):
        registry.request_promotion("promo", 1, "production", "", "alice")
        registry.request_promotion("promo", 1, "production", "", "alice")


def test_production_stage_only_through_promotion(registry: Registry) -> None:
    _ready_version(registry, "stage")
    assert registry.transition_stage("stage", 1, domain.STAGE_STAGING).stage == domain.STAGE_STAGING
    with pytest.raises(FailedPrecondition, match="approved promotion"):
        registry.transition_stage("stage", 1, domain.STAGE_PRODUCTION)


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
