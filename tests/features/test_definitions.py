"""Entities and versioned feature views on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from strata.features.v1 import features_pb2 as pb

from services.common.errors import InvalidArgument, NotFound
from services.features.definitions import Definitions
from tests.features.conftest import F64, I64, apply_basics, user_view


def test_schema_change_creates_a_version_and_keeps_the_old_one(definitions: Definitions) -> None:
    apply_basics(definitions)
    v1, outcome = definitions.apply_view(user_view(), "alice")
    assert (v1.version, outcome) == (1, "CREATED")
    assert definitions.apply_view(user_view(), "alice")[1] == "UNCHANGED"
    v, outcome = definitions.apply_view(user_view(description="spend and orders", owner="growth"), "bob")
    assert (v.version, outcome) == (1, "UPDATED")
    changed = user_view(description="spend and orders", owner="growth")
    changed.features.append(pb.Feature(name="refunds_7d", dtype=I64))
    v2, outcome = definitions.apply_view(changed, "bob")
    assert (v2.version, outcome, v2.created_by) == (2, "NEW_VERSION", "bob")
    assert definitions.get_view("user_stats").spec.version == 2
    old = definitions.get_view("user_stats", 1).spec
    assert [f.name for f in old.features] == ["spend_7d", "orders_7d", "segment", "active"]
    assert [v.version for v in definitions.versions("user_stats")[0]] == [2, 1]
    retyped = user_view()
    retyped.features[1].dtype = F64  # a type change is a schema change too
    assert definitions.apply_view(retyped, "bob")[0].version == 3


def test_search_by_name_tag_owner_entity_and_text(definitions: Definitions) -> None:
    apply_basics(definitions)
    definitions.apply_view(user_view(owner="growth", tags={"team": "growth", "pii": "no"},
                                     description="Customer spend"), "a")
    merchant = pb.FeatureView(name="merchant_risk", entities=["merchant"], owner="risk", tags={"team": "risk"},
                              features=[pb.Feature(name="chargeback_rate", dtype=F64, description="30 day")])
    definitions.apply_view(merchant, "a")
    names = lambda **kw: [v.name for v in definitions.search(**kw)]  # noqa: E731
    assert names() == ["merchant_risk", "user_stats"]
    assert names(query="chargeback") == ["merchant_risk"]
    assert names(query="customer SPEND") == ["user_stats"]
    assert names(tag="team=risk") == ["merchant_risk"]
    assert names(tag="pii") == ["user_stats"]
    assert names(owner="growth") == ["user_stats"]
    assert names(entity="merchant") == ["merchant_risk"]
    assert names(after="merchant_risk") == ["user_stats"]


@pytest.mark.parametrize("mutate, field", [
    (lambda v: setattr(v, "name", "Bad Name"), "feature_view.name"),
    (lambda v: v.ClearField("features"), "feature_view.features"),
    (lambda v: v.features.append(pb.Feature(name="spend_7d", dtype=F64)), "feature_view.features[4].name"),
    (lambda v: setattr(v.features[0], "dtype", 0), "feature_view.features[0].dtype"),
    (lambda v: setattr(v, "ttl_seconds", -1), "feature_view.ttl_seconds"),
    (lambda v: v.features[1].validation.allowed_values.append("x"), "feature_view.features[1].validation.allowed_values"),
    (lambda v: v.features.append(pb.Feature(name="user_id", dtype=I64)), "feature_view.features[4].name"),
])
def test_invalid_views_name_the_field_and_change_nothing(definitions: Definitions, mutate, field: str) -> None:  # noqa: ANN001
    apply_basics(definitions)
    view = user_view()
    mutate(view)
    with pytest.raises(InvalidArgument) as err:
        definitions.apply_view(view, "a")
    assert err.value.field == field
    assert definitions.search() == []


def test_unknown_entity_and_view(definitions: Definitions) -> None:
    with pytest.raises(NotFound, match="entities/user not found"):
        definitions.apply_view(user_view(), "a")
    with pytest.raises(NotFound, match="featureViews/nope not found"):
        definitions.get_view("nope")
    apply_basics(definitions)
    with pytest.raises(InvalidArgument, match="cannot change"):
        definitions.apply_entity(pb.Entity(name="user", join_key="uid", value_type=pb.VALUE_TYPE_INT64))


def test_feature_sets_apply_get_list_and_refuse_bad_references(definitions: Definitions) -> None:
    apply_basics(definitions)
    definitions.apply_view(user_view(), "a")
    fs = pb.FeatureSet(name="fraud_v1", features=["user_stats:spend_7d", "user_stats:segment"], owner="risk")
    got, outcome = definitions.apply_feature_set(fs)
    assert outcome == "CREATED" and list(got.features) == list(fs.features) and got.create_time.seconds > 0
    assert definitions.apply_feature_set(fs)[1] == "UNCHANGED"
    fs.features.append("user_stats:orders_7d")
    got, outcome = definitions.apply_feature_set(fs)
    assert outcome == "UPDATED" and got.update_time.ToNanoseconds() >= got.create_time.ToNanoseconds()
    assert list(definitions.get_feature_set("fraud_v1").features) == list(fs.features)
    definitions.apply_feature_set(pb.FeatureSet(name="churn_v1", features=["user_stats:active"]))
    assert [s.name for s in definitions.feature_sets()[0]] == ["churn_v1", "fraud_v1"]
    with pytest.raises(NotFound, match="featureSets/nope"):
        definitions.get_feature_set("nope")
    bad = [
        (pb.FeatureSet(name="Bad Name", features=["user_stats:active"]), InvalidArgument, "feature_set.name"),
        (pb.FeatureSet(name="empty"), InvalidArgument, "feature_set.features"),
        (pb.FeatureSet(name="x", features=["user_stats:active", "nocolon"]), InvalidArgument,
         r"feature_set.features\[1\]"),
        (pb.FeatureSet(name="x", features=["user_stats:active", "user_stats:active"]), InvalidArgument,
         r"feature_set.features\[1\].*twice"),
        (pb.FeatureSet(name="x", features=["user_stats:active", "ghost:f"]), NotFound,
         r"featureViews/ghost.*features\[1\]"),
        (pb.FeatureSet(name="fraud_v1", features=["user_stats:nope"]), InvalidArgument,
         r"feature_set.features\[0\].*no feature 'nope'"),
    ]
    for spec, error, message in bad:
        with pytest.raises(error, match=message):
            definitions.apply_feature_set(spec)
    # nothing of a refused apply was written
    assert [s.name for s in definitions.feature_sets()[0]] == ["churn_v1", "fraud_v1"]
    assert list(definitions.get_feature_set("fraud_v1").features) == list(fs.features)
