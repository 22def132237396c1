"""Protobuf <-> the feature store's plain types (types.py), for the servicer (the transport side).

Requests come in without copies where the domain only reads them: repeated fields and maps are
passed through as the Sequences and Mappings the domain types declare (an online read of 100
entities x 20 features copies nothing here). Fields the service sets (versions, create and update
times, created_by) are not read from requests. Answers go out as messages, except the raw online
answer, written as bytes by wire.py.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TypeVar

from strata.features.v1 import features_pb2 as pb

from services.common.convert import timestamp_pb
from services.common.fingerprint import fingerprint
from services.features import wire
from services.features.online_serving import OnlineRows
from services.features.types import (
    Dataset, DataSource, DataType, Entity, Feature, FeatureSet, FeatureView, HistoricalQuery, MaterializeProgress,
    OnlineQuery, PushRequest, PushResult, Statistics, TrainingSetRequest, ValidationRule, ValueType,
)

E = TypeVar("E", bound=IntEnum)
_NO_RULE = ValidationRule()


def _enum(kind: type[E], number: int) -> E | int:
    """The enum member, or the number itself where the enum has none (the domain refuses it,
    naming the field, as it did the number)."""
    try:
        return kind(number)
    except ValueError:
        return number


# -- definitions ---------------------------------------------------------------------------------
def entity(e: pb.Entity) -> Entity:
    return Entity(name=e.name, join_key=e.join_key, value_type=_enum(ValueType, e.value_type),
                  description=e.description, owner=e.owner, tags=dict(e.tags))


def entity_pb(e: Entity) -> pb.Entity:
    return pb.Entity(name=e.name, join_key=e.join_key, value_type=int(e.value_type), description=e.description,
                     owner=e.owner, tags=e.tags, create_time=timestamp_pb(e.create_time))


def _rule(r: pb.ValidationRule) -> ValidationRule:
    return ValidationRule(min=r.min, has_min=r.has_min, max=r.max, has_max=r.has_max,
                          allowed_values=tuple(r.allowed_values), max_null_rate=r.max_null_rate,
                          has_max_null_rate=r.has_max_null_rate)


def _rule_pb(r: ValidationRule) -> pb.ValidationRule | None:
    if r == _NO_RULE:  # left out, as before: a view without rules carries no empty message
        return None
    return pb.ValidationRule(min=r.min, has_min=r.has_min, max=r.max, has_max=r.has_max,
                             allowed_values=r.allowed_values, max_null_rate=r.max_null_rate,
                             has_max_null_rate=r.has_max_null_rate)


def feature_view(v: pb.FeatureView) -> FeatureView:
    s = v.source
    return FeatureView(
        name=v.name, entities=tuple(v.entities), ttl_seconds=v.ttl_seconds, owner=v.owner,
        description=v.description, tags=dict(v.tags),
        features=tuple(Feature(name=f.name, dtype=_enum(DataType, f.dtype), description=f.description,
                               validation=_rule(f.validation)) for f in v.features),
        source=DataSource(path=s.path, timestamp_field=s.timestamp_field,
                          created_timestamp_field=s.created_timestamp_field))


def feature_view_pb(v: FeatureView) -> pb.FeatureView:
    s = v.source
    return pb.FeatureView(
        name=v.name, version=v.version, entities=v.entities, ttl_seconds=v.ttl_seconds, owner=v.owner,
        description=v.description, tags=v.tags, created_by=v.created_by,
        features=[pb.Feature(name=f.name, dtype=int(f.dtype), description=f.description,
                             validation=_rule_pb(f.validation)) for f in v.features],
        source=pb.DataSource(path=s.path, timestamp_field=s.timestamp_field,
                             created_timestamp_field=s.created_timestamp_field) if s != DataSource() else None,
        create_time=timestamp_pb(v.create_time), update_time=timestamp_pb(v.update_time))


def feature_set(fs: pb.FeatureSet) -> FeatureSet:
    return FeatureSet(name=fs.name, features=tuple(fs.features), description=fs.description, owner=fs.owner,
                      tags=dict(fs.tags), defaults=dict(fs.defaults))


def feature_set_pb(fs: FeatureSet) -> pb.FeatureSet:
    return pb.FeatureSet(name=fs.name, features=fs.features, description=fs.description, owner=fs.owner,
                         tags=fs.tags, create_time=timestamp_pb(fs.create_time),
                         update_time=timestamp_pb(fs.update_time), defaults=fs.defaults)


# -- online reads and pushes ---------------------------------------------------------------------
def online_query(r: pb.GetOnlineFeaturesRequest) -> OnlineQuery:
    return OnlineQuery(features=r.features, entities=r.entities, raw=r.raw, feature_set=r.feature_set)


def online_response(read: OnlineRows) -> pb.GetOnlineFeaturesResponse | bytes:
    """A raw read's answer already serialized (wire.py; the server sends the bytes as they
    are), a typed one as the message."""
    if read.raw:
        return wire.encode_online(read)
    values = read.values()
    resp = pb.GetOnlineFeaturesResponse(view_versions=values.view_versions)
    add = resp.features.add
    for c in values.features:  # built in place: extend() would copy each message
        fields = {"name": c.name, "statuses": c.statuses, "event_timestamps_us": c.event_timestamps_us}
        # Only the filled value list: protobuf takes time even over an empty one.
        if c.double_values:
            fields["double_values"] = c.double_values
        elif c.int64_values:
            fields["int64_values"] = c.int64_values
        elif c.bool_values:
            fields["bool_values"] = c.bool_values
        elif c.string_values:
            fields["string_values"] = c.string_values
        add(**fields)
    return resp


def push_request(r: pb.PushFeaturesRequest) -> PushRequest:
    # FeatureValues messages are the domain's ValueColumns as they are.
    return PushRequest(view=r.view, entities=r.entities, features=r.features,
                       event_timestamps_us=r.event_timestamps_us)


def push_response(result: PushResult) -> pb.PushFeaturesResponse:
    return pb.PushFeaturesResponse(rows_written=result.rows_written, view_version=result.view_version)


# -- materialization -----------------------------------------------------------------------------
def materialize_response(p: MaterializeProgress) -> pb.MaterializeResponse:
    return pb.MaterializeResponse(rows_written=p.rows_written, rows_total=p.rows_total, done=p.done,
                                  start_us=p.start_us, end_us=p.end_us, view_version=p.view_version)


def statistics_response(s: Statistics) -> pb.GetFeatureStatisticsResponse:
    return pb.GetFeatureStatisticsResponse(
        view_version=s.view_version, compute_time=timestamp_pb(s.compute_time), start_us=s.start_us,
        end_us=s.end_us, features=[pb.FeatureStatistics(
            name=f.name, count=f.count, nulls=f.nulls, min=f.min, max=f.max, mean=f.mean, std=f.std,
            quantiles=f.quantiles, distinct=f.distinct) for f in s.features])


# -- historical retrieval and training sets ------------------------------------------------------
def historical_query(r: pb.GetHistoricalFeaturesRequest) -> HistoricalQuery:
    return HistoricalQuery(features=r.features, feature_set=r.feature_set, entity_arrow=r.entity_arrow,
                           entity_uri=r.entity_uri, timestamp_column=r.timestamp_column,
                           filter_by_created_timestamp=r.filter_by_created_timestamp)


def historical_response(arrow_ipc: bytes) -> pb.GetHistoricalFeaturesResponse:
    return pb.GetHistoricalFeaturesResponse(arrow_ipc=arrow_ipc)


def _fingerprint(request: pb.CreateTrainingSetRequest) -> str:
    """What a retry with the same request id must repeat (everything but the id), as the digest
    stored in training_sets.request_hash: of the serialized message, as it always was."""
    payload = pb.CreateTrainingSetRequest()
    payload.CopyFrom(request)
    payload.request_id = ""
    return fingerprint(payload.SerializeToString(deterministic=True))


def training_set_request(r: pb.CreateTrainingSetRequest) -> TrainingSetRequest:
    return TrainingSetRequest(
        output_uri=r.output_uri, request_hash=_fingerprint(r), features=r.features, feature_set=r.feature_set,
        entity_arrow=r.entity_arrow, entity_uri=r.entity_uri, timestamp_column=r.timestamp_column,
        filter_by_created_timestamp=r.filter_by_created_timestamp, overwrite=r.overwrite, request_id=r.request_id)


def dataset_pb(ds: Dataset) -> pb.Dataset:
    return pb.Dataset(dataset_id=ds.dataset_id, uri=ds.uri, sha256=ds.sha256, rows=ds.rows, features=ds.features,
                      feature_set=ds.feature_set, created_by=ds.created_by, create_time=timestamp_pb(ds.create_time))
