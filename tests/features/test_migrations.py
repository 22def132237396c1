"""Migration 0006 on SQLite and PostgreSQL: what revisions 0001-0005 stored as serialized messages
(entities, view versions with their schema hash, feature sets, statistics, datasets) reads the same
after it, applying an unchanged view is still a no-op (same version), and a downgrade gives the
messages and hashes back."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from google.protobuf import timestamp_pb2
from strata.features.v1 import features_pb2 as pb

from services.common.db import Database
from services.features import convert
from services.features.app import MIGRATIONS
from services.features.definitions import Definitions
from services.features.files import OfflineFiles
from services.features.materialize import Materializer
from services.features.online import SqliteOnlineStore
from services.features.records import dataset_from_json, schema_hash
from services.features.types import Feature, FeatureStatistics, Statistics
from tests.features.conftest import I64, user_view, user_view_pb

T1 = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)
T2 = datetime(2026, 11, 2, 8, 30, tzinfo=UTC)

_entities = sa.table("entities", sa.column("name"), sa.column("spec", sa.LargeBinary),
                     sa.column("create_time", sa.DateTime(timezone=True)),
                     sa.column("update_time", sa.DateTime(timezone=True)))
_views = sa.table("feature_views", sa.column("name"), sa.column("version"), sa.column("spec", sa.LargeBinary),
                  sa.column("schema_hash"), sa.column("created_by"),
                  sa.column("create_time", sa.DateTime(timezone=True)),
                  sa.column("update_time", sa.DateTime(timezone=True)))
_heads = sa.table("feature_view_heads", sa.column("name"), sa.column("version"), sa.column("owner"),
                  sa.column("entity_list"), sa.column("search_text"), sa.column("tags", sa.JSON))
_sets = sa.table("feature_sets", sa.column("name"), sa.column("spec", sa.LargeBinary),
                 sa.column("create_time", sa.DateTime(timezone=True)),
                 sa.column("update_time", sa.DateTime(timezone=True)))
_runs = sa.table("materializations", sa.column("view"), sa.column("version"), sa.column("end_us"),
                 sa.column("start_us"), sa.column("rows"), sa.column("finish_time", sa.DateTime(timezone=True)),
                 sa.column("stats", sa.LargeBinary))
_training_sets = sa.table("training_sets", sa.column("uri"), sa.column("state"), sa.column("created_by"),
                          sa.column("request_id"), sa.column("request_hash"), sa.column("dataset", sa.LargeBinary),
                          sa.column("create_time", sa.DateTime(timezone=True)),
                          sa.column("update_time", sa.DateTime(timezone=True)))


def _alembic(db: Database, action: Callable[[Config, str], None], revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection_url"] = db.url
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        action(cfg, revision)


def _ts(t: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def _old_schema_hash(v: pb.FeatureView) -> str:
    """As revisions 0001-0005 computed it (definitions.schema_hash then)."""
    schema = pb.FeatureView(entities=v.entities, ttl_seconds=v.ttl_seconds, source=v.source,
                            features=[pb.Feature(name=f.name, dtype=f.dtype) for f in v.features])
    return hashlib.sha256(schema.SerializeToString(deterministic=True)).hexdigest()


def _write_the_old_way(db: Database) -> dict:
    """Rows as the service wrote them at revision 0005; returns the messages written."""
    user = pb.Entity(name="user", join_key="user_id", value_type=pb.VALUE_TYPE_INT64, owner="core",
                     tags={"pii": "yes"}, create_time=_ts(T1))
    view = user_view_pb(ttl=3600, owner="growth", description="Customer spend", tags={"team": "growth"})
    view.version, view.created_by = 1, "alice"
    view.create_time.CopyFrom(_ts(T1))
    view.update_time.CopyFrom(_ts(T2))
    fs = pb.FeatureSet(name="fraud_v1", features=["user_stats:spend_7d", "user_stats:segment"], owner="risk",
                       create_time=_ts(T1), update_time=_ts(T1))
    stats = pb.GetFeatureStatisticsResponse(view_version=1, compute_time=_ts(T2), start_us=5, end_us=9, features=[
        pb.FeatureStatistics(name="spend_7d", count=3, nulls=1, min=0.5, max=9.0, mean=4.0, std=1.5,
                             quantiles=[0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 9.0], distinct=3),
        pb.FeatureStatistics(name="segment", count=3, nulls=0, distinct=2)])
    dataset = pb.Dataset(dataset_id="ds-0123456789abcdef", uri="training-sets/a.parquet", sha256="ab" * 32,
                         rows=3, features=["user_stats:spend_7d@v1"], feature_set="fraud_v1", created_by="alice",
                         create_time=_ts(T2))
    with db.session() as c:
        c.execute(sa.insert(_entities).values(name="user", spec=user.SerializeToString(), create_time=T1,
                                              update_time=T1))
        c.execute(sa.insert(_views).values(name=view.name, version=1, spec=view.SerializeToString(),
                                           schema_hash=_old_schema_hash(view), created_by="alice", create_time=T1,
                                           update_time=T2))
        c.execute(sa.insert(_heads).values(name=view.name, version=1, owner="growth", entity_list=",user,",
                                           search_text="user_stats customer spend", tags={"team": "growth"}))
        c.execute(sa.insert(_sets).values(name="fraud_v1", spec=fs.SerializeToString(), create_time=T1,
                                          update_time=T1))
        c.execute(sa.insert(_runs).values(view=view.name, version=1, end_us=9, start_us=5, rows=3, finish_time=T2,
                                          stats=stats.SerializeToString()))
        c.execute(sa.insert(_runs).values(view=view.name, version=1, end_us=12, start_us=9, rows=0,
                                          finish_time=T2, stats=None))  # a run that found nothing
        c.execute(sa.insert(_training_sets).values(uri="/store/training-sets/a.parquet", state="READY",
                                                   created_by="alice", request_id="r1", request_hash="h" * 64,
                                                   dataset=dataset.SerializeToString(), create_time=T2,
                                                   update_time=T2))
        c.execute(sa.insert(_training_sets).values(uri="/store/training-sets/b.parquet", state="PENDING",
                                                   created_by="bob", request_id=None, request_hash="h" * 64,
                                                   dataset=None, create_time=T2, update_time=T2))
    return {"entity": user, "view": view, "set": fs, "stats": stats, "dataset": dataset}


def test_an_unchanged_view_applied_after_the_upgrade_keeps_its_version(database_url: str, tmp_path) -> None:  # noqa: ANN001
    db = Database(database_url)
    try:
        _alembic(db, command.upgrade, "0005")
        old = _write_the_old_way(db)
        db.migrate(MIGRATIONS)
        d = Definitions(db)
        same = user_view(ttl=3600, owner="growth", description="Customer spend", tags={"team": "growth"})
        applied, outcome = d.apply_view(same, "bob")
        assert (outcome, applied.version, applied.created_by) == ("UNCHANGED", 1, "alice")
        assert (applied.create_time, applied.update_time) == (T1, T2)
        assert convert.feature_view_pb(applied) == old["view"]
        with db.read() as c:
            stored = c.execute(sa.select(_views.c.schema_hash)).scalar_one()
        assert stored == schema_hash(applied)
        # The rest reads as it was written.
        assert [convert.entity_pb(e) for e in d.entities()[0]] == [old["entity"]]
        assert convert.feature_set_pb(d.get_feature_set("fraud_v1")) == old["set"]
        m = Materializer(db, d, SqliteOnlineStore(str(tmp_path / "online.db")), OfflineFiles(str(tmp_path)))
        assert m.statistics("user_stats") == Statistics(
            view_version=1, compute_time=T2, start_us=5, end_us=9, features=(
                FeatureStatistics(name="spend_7d", count=3, nulls=1, min=0.5, max=9.0, mean=4.0, std=1.5,
                                  quantiles=(0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 9.0), distinct=3),
                FeatureStatistics(name="segment", count=3, nulls=0, distinct=2)))
        assert [r.end_us for r in m.runs("user_stats")] == [12, 9]
        with db.read() as c:
            datasets = dict(c.execute(sa.select(sa.column("uri"), sa.column("dataset"))
                                      .select_from(sa.table("training_sets"))).all())
        assert convert.dataset_pb(dataset_from_json(datasets["/store/training-sets/a.parquet"])) == old["dataset"]
        assert datasets["/store/training-sets/b.parquet"] is None
        # Updates and schema changes behave as before the upgrade.
        assert d.apply_view(replace(same, description="Spend"), "bob")[1:] == ("UPDATED",)
        changed = replace(same, features=(*same.features, Feature(name="refunds_7d", dtype=I64)))
        v2, outcome = d.apply_view(changed, "bob")
        assert (outcome, v2.version) == ("NEW_VERSION", 2)
        assert d.get_view("user_stats", 1).spec.description == "Spend"
    finally:
        db.dispose()


def test_a_downgrade_writes_the_messages_back(database_url: str) -> None:
    db = Database(database_url)
    try:
        _alembic(db, command.upgrade, "0005")
        old = _write_the_old_way(db)
        db.migrate(MIGRATIONS)
        _alembic(db, command.downgrade, "0005")
        with db.read() as c:
            entity = c.execute(sa.select(_entities.c.spec)).scalar_one()
            view, digest = c.execute(sa.select(_views.c.spec, _views.c.schema_hash)).one()
            fs = c.execute(sa.select(_sets.c.spec)).scalar_one()
            stats = c.execute(sa.select(_runs.c.stats).order_by(_runs.c.end_us)).scalars().all()
            datasets = c.execute(sa.select(_training_sets.c.dataset).order_by(_training_sets.c.uri)).scalars().all()
        assert pb.Entity.FromString(bytes(entity)) == old["entity"]
        assert pb.FeatureView.FromString(bytes(view)) == old["view"] and digest == _old_schema_hash(old["view"])
        assert pb.FeatureSet.FromString(bytes(fs)) == old["set"]
        assert pb.GetFeatureStatisticsResponse.FromString(bytes(stats[0])) == old["stats"] and stats[1] is None
        assert pb.Dataset.FromString(bytes(datasets[0])) == old["dataset"] and datasets[1] is None
        db.migrate(MIGRATIONS)  # and up again
        applied, outcome = Definitions(db).apply_view(user_view(ttl=3600, owner="growth",
                                                                description="Customer spend",
                                                                tags={"team": "growth"}), "bob")
        assert (outcome, applied.version) == ("UNCHANGED", 1)
    finally:
        db.dispose()
