"""definitions, statistics and datasets as JSON

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 09:00:00

The feature store's domain no longer knows protobuf, so what it stored as serialized messages
(entities.spec, feature_views.spec, feature_sets.spec, materializations.stats,
training_sets.dataset) becomes JSON text in the form services/features/records.py reads and
writes. A view version's schema_hash was the digest of a serialized message; it is recomputed as
records.schema_hash computes it, so applying an unchanged view after the upgrade is still a
no-op. Both are written out here (not imported) so that this revision keeps doing what it did
whatever records.py becomes. Downgrade writes the messages and their digests back.
"""

import hashlib
import json
from datetime import UTC, datetime

from alembic import op
import sqlalchemy as sa
from strata.features.v1 import features_pb2 as pb


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# table, column, primary key, nullable
_COLUMNS = [
    ('entities', 'spec', ('name',), False),
    ('feature_views', 'spec', ('name', 'version'), False),
    ('feature_sets', 'spec', ('name',), False),
    ('materializations', 'stats', ('view', 'version', 'end_us'), True),
    ('training_sets', 'dataset', ('uri',), True),
]


def _dump(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _time(msg, field: str):  # noqa: ANN001, ANN202
    return getattr(msg, field).ToDatetime(tzinfo=UTC).isoformat() if msg.HasField(field) else None


def _set_time(msg, field: str, text) -> None:  # noqa: ANN001
    if text is not None:
        getattr(msg, field).FromDatetime(datetime.fromisoformat(text))


def schema_hash(view: dict) -> str:
    """records.schema_hash of the view's JSON form."""
    s = view["source"]
    schema = {"entities": view["entities"], "ttl_seconds": view["ttl_seconds"],
              "source": [s["path"], s["timestamp_field"], s["created_timestamp_field"]],
              "features": [[f["name"], f["dtype"]] for f in view["features"]]}
    return hashlib.sha256(_dump(schema).encode()).hexdigest()


def _old_schema_hash(v: pb.FeatureView) -> str:
    """The digest 0001-0005 stored: of the serialized schema message."""
    schema = pb.FeatureView(entities=v.entities, ttl_seconds=v.ttl_seconds, source=v.source,
                            features=[pb.Feature(name=f.name, dtype=f.dtype) for f in v.features])
    return hashlib.sha256(schema.SerializeToString(deterministic=True)).hexdigest()


# -- message -> JSON -----------------------------------------------------------------------------
def _entity(e: pb.Entity) -> dict:
    return {"name": e.name, "join_key": e.join_key, "value_type": e.value_type, "description": e.description,
            "owner": e.owner, "tags": dict(e.tags), "create_time": _time(e, "create_time")}


def _view(v: pb.FeatureView) -> dict:
    return {"name": v.name, "version": v.version, "entities": list(v.entities),
            "features": [{"name": f.name, "dtype": f.dtype, "description": f.description, "validation": {
                "min": f.validation.min, "has_min": f.validation.has_min, "max": f.validation.max,
                "has_max": f.validation.has_max, "allowed_values": list(f.validation.allowed_values),
                "max_null_rate": f.validation.max_null_rate, "has_max_null_rate": f.validation.has_max_null_rate}}
                for f in v.features],
            "ttl_seconds": v.ttl_seconds,
            "source": {"path": v.source.path, "timestamp_field": v.source.timestamp_field,
                       "created_timestamp_field": v.source.created_timestamp_field},
            "owner": v.owner, "description": v.description, "tags": dict(v.tags),
            "create_time": _time(v, "create_time"), "update_time": _time(v, "update_time"), "created_by": v.created_by}


def _feature_set(fs: pb.FeatureSet) -> dict:
    return {"name": fs.name, "features": list(fs.features), "description": fs.description, "owner": fs.owner,
            "tags": dict(fs.tags), "create_time": _time(fs, "create_time"), "update_time": _time(fs, "update_time")}


def _statistics(s: pb.GetFeatureStatisticsResponse) -> dict:
    return {"view_version": s.view_version, "compute_time": _time(s, "compute_time"), "start_us": s.start_us,
            "end_us": s.end_us, "features": [
                {"name": f.name, "count": f.count, "nulls": f.nulls, "min": f.min, "max": f.max, "mean": f.mean,
                 "std": f.std, "quantiles": list(f.quantiles), "distinct": f.distinct} for f in s.features]}


def _dataset(d: pb.Dataset) -> dict:
    return {"dataset_id": d.dataset_id, "uri": d.uri, "sha256": d.sha256, "rows": d.rows,
            "features": list(d.features), "feature_set": d.feature_set, "created_by": d.created_by,
            "create_time": _time(d, "create_time")}


# -- JSON -> message (downgrade) -----------------------------------------------------------------
def _entity_pb(d: dict) -> pb.Entity:
    out = pb.Entity(name=d["name"], join_key=d["join_key"], value_type=d["value_type"],
                    description=d["description"], owner=d["owner"], tags=d["tags"])
    _set_time(out, "create_time", d["create_time"])
    return out


def _view_pb(d: dict) -> pb.FeatureView:
    out = pb.FeatureView(
        name=d["name"], version=d["version"], entities=d["entities"], ttl_seconds=d["ttl_seconds"],
        # Rules and a source only where set: an unset one was no message (what an apply compares).
        features=[pb.Feature(name=f["name"], dtype=f["dtype"], description=f["description"],
                             validation=pb.ValidationRule(**f["validation"]) if any(f["validation"].values()) else None)
                  for f in d["features"]],
        source=pb.DataSource(**d["source"]) if any(d["source"].values()) else None, owner=d["owner"],
        description=d["description"], tags=d["tags"], created_by=d["created_by"])
    _set_time(out, "create_time", d["create_time"])
    _set_time(out, "update_time", d["update_time"])
    return out


def _feature_set_pb(d: dict) -> pb.FeatureSet:
    out = pb.FeatureSet(name=d["name"], features=d["features"], description=d["description"], owner=d["owner"],
                        tags=d["tags"])
    _set_time(out, "create_time", d["create_time"])
    _set_time(out, "update_time", d["update_time"])
    return out


def _statistics_pb(d: dict) -> pb.GetFeatureStatisticsResponse:
    out = pb.GetFeatureStatisticsResponse(view_version=d["view_version"], start_us=d["start_us"],
                                          end_us=d["end_us"], features=[pb.FeatureStatistics(**f)
                                                                        for f in d["features"]])
    _set_time(out, "compute_time", d["compute_time"])
    return out


def _dataset_pb(d: dict) -> pb.Dataset:
    out = pb.Dataset(**{k: v for k, v in d.items() if k != "create_time"})
    _set_time(out, "create_time", d["create_time"])
    return out


_TO_JSON = {'entities': (pb.Entity, _entity), 'feature_views': (pb.FeatureView, _view),
            'feature_sets': (pb.FeatureSet, _feature_set),
            'materializations': (pb.GetFeatureStatisticsResponse, _statistics),
            'training_sets': (pb.Dataset, _dataset)}
_TO_PB = {'entities': _entity_pb, 'feature_views': _view_pb, 'feature_sets': _feature_set_pb,
          'materializations': _statistics_pb, 'training_sets': _dataset_pb}


def _rewrite(table: str, column: str, key: tuple[str, ...], nullable: bool, new_type: sa.types.TypeEngine,
             convert) -> None:  # noqa: ANN001
    """Every row's `column` through `convert` (value -> new value, or with the schema hash for
    feature_views), into a column of `new_type` that then takes the old one's name."""
    temp = f"{column}_new"
    with op.batch_alter_table(table) as batch:
        batch.add_column(sa.Column(temp, new_type, nullable=True))
    t = sa.table(table, *(sa.column(k) for k in key), sa.column(column), sa.column(temp),
                 sa.column('schema_hash'))
    conn = op.get_bind()
    for row in conn.execute(sa.select(*(t.c[k] for k in key), t.c[column]).where(t.c[column].is_not(None))).all():
        values = convert(row[-1])
        if not isinstance(values, dict):
            values = {temp: values}
        conn.execute(t.update().where(*(t.c[k] == row[i] for i, k in enumerate(key))).values(**values))
    with op.batch_alter_table(table) as batch:
        batch.drop_column(column)
        batch.alter_column(temp, new_column_name=column, existing_type=new_type, nullable=nullable)


def upgrade() -> None:
    for table, column, key, nullable in _COLUMNS:
        message, to_json = _TO_JSON[table]

        def convert(blob, message=message, to_json=to_json, table=table, column=column):  # noqa: ANN001, ANN202
            d = to_json(message.FromString(bytes(blob)))
            if table == 'feature_views':
                return {f"{column}_new": _dump(d), 'schema_hash': schema_hash(d)}
            return _dump(d)
        _rewrite(table, column, key, nullable, sa.Text(), convert)


def downgrade() -> None:
    for table, column, key, nullable in _COLUMNS:
        to_pb = _TO_PB[table]

        def convert(text, to_pb=to_pb, table=table, column=column):  # noqa: ANN001, ANN202
            msg = to_pb(json.loads(text))
            if table == 'feature_views':
                return {f"{column}_new": msg.SerializeToString(), 'schema_hash': _old_schema_hash(msg)}
            return msg.SerializeToString()
        _rewrite(table, column, key, nullable, sa.LargeBinary(), convert)
