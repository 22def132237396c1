"""Migration 0005 on SQLite and PostgreSQL: a database whose policy revisions hold serialized
protobuf TrafficPolicy messages (as every revision before it was written) is upgraded; its
endpoint still reads, routes a prediction, rolls back, and a retried CreateEndpoint with the
first call's request id still answers the endpoint it made. Downgrading writes the messages back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from strata.inference.v1 import inference_pb2 as pb

from services.common.db import Database
from services.common.errors import InvalidArgument
from services.common.fingerprint import fingerprint
from services.common.idempotency import RequestIds
from services.inference import tables as t
from services.inference.batching import BatchingConfig
from services.inference.convert import policy_from_pb
from services.inference.dataplane import DataPlane, PredictRequest
from services.inference.endpoints import EndpointStore, create_payload
from services.inference.entities import CanaryLimits, PolicyBatching, Target, TrafficPolicy
from services.inference.model_store import LoadedModel, ModelRef
from services.inference.predlog import FileSink, PredictionLog
from services.inference.routing import Engine, Route
from services.inference.runtime import ModelRuntime
from services.inference.tables import MIGRATIONS
from services.inference.tensors import InputTensor
from tests.inference import models

# The request as a client sent it (alias unresolved) and the policy stored from it.
ASKED = pb.TrafficPolicy(targets=[pb.Target(model="mlp", alias="champion", weight=1)],
                         batching=pb.BatchingConfig())
FIRST = pb.TrafficPolicy(targets=[pb.Target(model="mlp", version=3, alias="champion", weight=1)],
                         batching=pb.BatchingConfig())
SECOND = pb.TrafficPolicy(targets=[pb.Target(model="mlp", version=3, weight=9), pb.Target(model="mlp", version=4,
                                                                                          weight=1)],
                          shadows=[pb.Target(model="mlp", version=2)], sticky=True,
                          canary=pb.CanaryLimits(target_index=1, max_error_rate=0.25, min_requests=50),
                          batching=pb.BatchingConfig(max_batch_size=8, max_queue_delay_us=100))


def _alembic(db: Database, step: str, to: str) -> None:
    """`alembic upgrade|downgrade TO` on the service's migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, step)(cfg, to)


def _old_payload(description: str, policy: pb.TrafficPolicy) -> dict:
    """The payload CreateEndpoint digested before 0005."""
    return {"name": "fraud", "description": description, "production": False,
            "policy": policy.SerializeToString(deterministic=True).hex()}


@pytest.fixture()
def old_db(database_url: str) -> Iterator[Database]:
    """At revision 0004, with one endpoint of two revisions and two CreateEndpoint request ids:
    one whose request can be rebuilt from what is stored, one (made with another description)
    that cannot."""
    db = Database(database_url)
    _alembic(db, "upgrade", "0004")
    now = datetime.now(UTC)
    revisions = sa.table("policy_revisions", sa.column("endpoint"), sa.column("revision"),
                         sa.column("policy", sa.LargeBinary), sa.column("created_by"), sa.column("reason"),
                         sa.column("create_time"))
    with db.engine.begin() as c:
        c.execute(sa.insert(t.endpoints).values(name="fraud", description="scores", revision=2, created_by="alice",
                                                create_time=now, update_time=now, production=False))
        for rev, policy in ((1, FIRST), (2, SECOND)):
            c.execute(sa.insert(revisions).values(endpoint="fraud", revision=rev, created_by="alice",
                                                  policy=policy.SerializeToString(deterministic=True),
                                                  reason="created" if rev == 1 else "set", create_time=now))
        for request_id, description in (("req-1", "scores"), ("req-2", "was different then")):
            c.execute(sa.insert(t.idempotency_keys).values(
                principal="alice", method="CreateEndpoint", request_id=request_id, resource="fraud",
                request_hash=fingerprint(_old_payload(description, ASKED)), create_time=now))
    yield db
    db.dispose()


class _Models:
    """The model store's lookups over one ONNX model served as every version."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.loaded: dict[ModelRef, LoadedModel] = {}
        self.pinned = set

    def get(self, ref: ModelRef) -> LoadedModel | None:
        return self.loaded.get(ref)

    async def load(self, ref: ModelRef) -> LoadedModel:
        return self.loaded.setdefault(ref, LoadedModel(ref, self.runtime, "0" * 64, 0.0))


def test_old_policies_read_route_and_roll_back_after_the_upgrade(old_db: Database) -> None:
    old_db.migrate(MIGRATIONS)
    store = EndpointStore(old_db)
    ep = store.get("fraud")
    assert ep.revision == 2 and ep.policy == policy_from_pb(SECOND)
    assert ep.policy == TrafficPolicy(
        targets=(Target("mlp", 3, "", 9), Target("mlp", 4, "", 1)), shadows=(Target("mlp", 2),), sticky=True,
        canary=CanaryLimits(target_index=1, max_error_rate=0.25, min_requests=50),
        batching=PolicyBatching(max_batch_size=8, max_queue_delay_us=100))
    assert store.policy_at("fraud", 1) == policy_from_pb(FIRST)
    assert store.policy_at("fraud", 1).batching == PolicyBatching()  # given empty: still given

    route = Route.build("fraud", 2, ep.policy, BatchingConfig())
    assert route.batching == BatchingConfig(max_batch_size=8, max_queue_delay_us=100, max_queue_size=1024)
    assert {route.pick("user-7") for _ in range(20)} == {route.pick("user-7")}  # sticky

    rolled = store.rollback("fraud", "bob")
    assert rolled.revision == 3 and rolled.policy == policy_from_pb(FIRST)


async def test_an_upgraded_endpoint_serves_predictions(old_db: Database, tmp_path: Path) -> None:
    old_db.migrate(MIGRATIONS)
    path = tmp_path / "mlp.onnx"
    path.write_bytes(models.mlp(seed=3))
    predlog = PredictionLog(FileSink(tmp_path / "log.binpb"), tmp_path / "spool", encode=lambda _e: b"", capacity=0)
    engine = Engine(_Models(ModelRuntime(path)), EndpointStore(old_db), predlog,  # type: ignore[arg-type]
                    worker_id="w1", default_batching=BatchingConfig())
    await engine.sync()
    assert engine.routes["fraud"].revision == 2 and not engine.failures
    x = np.ones((1, 32), np.float32)
    result = await DataPlane(engine).predict(PredictRequest(
        "fraud", [InputTensor("input", "FP32", [1, 32], x.tobytes())], (), "user-7", (), "r1"))
    assert result.revision == 2 and result.ref.version in (3, 4)
    assert [n for n, _ in result.outputs] == ["output"] and result.outputs[0][1].shape == (1, 2)
    await engine.close()
    for m in engine.store.loaded.values():  # type: ignore[attr-defined]
        await m.close()
    predlog.close()


def test_request_ids_of_creates_are_carried_over_when_their_request_can_be_rebuilt(old_db: Database) -> None:
    old_db.migrate(MIGRATIONS)
    store = EndpointStore(old_db)
    asked = policy_from_pb(ASKED)
    assert store.created("alice", "req-1", create_payload("fraud", "scores", asked, False)).name == "fraud"
    with pytest.raises(InvalidArgument, match="already used for a different request"):
        store.created("alice", "req-1", create_payload("fraud", "scores", policy_from_pb(FIRST), False))
    # Made with a description changed since: its request cannot be rebuilt; a retry is refused.
    with pytest.raises(InvalidArgument, match="already used for a different request"):
        store.created("alice", "req-2", create_payload("fraud", "was different then", asked, False))


def test_downgrade_writes_the_messages_back(old_db: Database) -> None:
    old_db.migrate(MIGRATIONS)
    _alembic(old_db, "downgrade", "0004")
    with old_db.engine.begin() as c:
        rows = dict(c.execute(sa.text("SELECT revision, policy FROM policy_revisions ORDER BY revision")).all())
        key = c.execute(sa.text("SELECT request_hash FROM idempotency_keys WHERE request_id = 'req-1'")).scalar_one()
    assert {r: pb.TrafficPolicy.FromString(bytes(p)) for r, p in rows.items()} == {1: FIRST, 2: SECOND}
    assert key == fingerprint(_old_payload("scores", ASKED))
    _alembic(old_db, "upgrade", "head")
    assert EndpointStore(old_db).get("fraud").policy == policy_from_pb(SECOND)
    ids = RequestIds(t.idempotency_keys)
    with old_db.read() as c:
        assert ids.lookup(c, "alice", "CreateEndpoint", "req-1",
                          create_payload("fraud", "scores", policy_from_pb(ASKED), False)) == "fraud"
