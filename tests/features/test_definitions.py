"""Entities and versioned feature views on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.features.definitions import Definitions
from services.features.types import Entity, Feature, FeatureSet, FeatureView, ValidationRule, ValueType
from tests.features.conftest import F64, I64, apply_basics, user_view


def test_schema_change_creates_a_version_and_keeps_the_old_one(definitions: Definitions) -> None:
    apply_basics(definitions)
    v1, outcome = definitions.apply_view(user_view(), "alice")
    assert (v1.version, outcome) == (1, "CREATED")
    assert definitions.apply_view(user_view(), "alice")[1] == "UNCHANGED"
    v, outcome = definitions.apply_view(user_view(description="spend and orders", owner="growth"), "bob")
    assert (v.version, outcome) == (1, "UPDATED")
    changed = user_view(description="spend and orders", owner="growth")
    changed = replace(changed, features=(*changed.features, Feature(name="refunds_7d", dtype=I64)))
    v2, outcome = definitions.apply_view(changed, "bob")
    assert (v2.version, outcome, v2.created_by) == (2, "NEW_VERSION", "bob")
    assert definitions.get_view("user_stats").spec.version == 2
    old = definitions.get_view("user_stats", 1).spec
    assert [f.name for f in old.features] == ["spend_7d", "orders_7d", "segment", "active"]
    assert [v.version for v in definitions.versions("user_stats")[0]] == [2, 1]
    retyped = user_view()
    features = list(retyped.features)
    features[1] = replace(features[1], dtype=F64)  # a type change is a schema change too
    retyped = replace(retyped, features=tuple(features))
    assert definitions.apply_view(retyped, "bob")[0].version == 3


def test_search_by_name_tag_owner_entity_and_text(definitions: Definitions) -> None:
    apply_basics(definitions)
    definitions.apply_view(user_view(owner="growth", tags={"team": "growth", "pii": "no"},
                                     description="Customer spend"), "a")
    merchant = FeatureView(name="merchant_risk", entities=["merchant"], owner="risk", tags={"team": "risk"},
                           features=[Feature(name="chargeback_rate", dtype=F64, description="30 day")])
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


def _feature(v: FeatureView, i: int, **changes: object) -> FeatureView:
    """The view with feature i changed."""
    features = list(v.features)
    features[i] = replace(features[i], **changes)
    return replace(v, features=tuple(features))


@pytest.mark.parametrize("mutate, field", [
    (lambda v: replace(v, name="Bad Name"), "feature_view.name"),
    (lambda v: replace(v, features=()), "feature_view.features"),
    (lambda v: replace(v, features=(*v.features, Feature(name="spend_7d", dtype=F64))),
     "feature_view.features[4].name"),
    (lambda v: _feature(v, 0, dtype=0), "feature_view.features[0].dtype"),
    (lambda v: replace(v, ttl_seconds=-1), "feature_view.ttl_seconds"),
    (lambda v: _feature(v, 1, validation=ValidationRule(allowed_values=("x",))),
     "feature_view.features[1].validation.allowed_values"),
    (lambda v: replace(v, features=(*v.features, Feature(name="user_id", dtype=I64))), "feature_view.features[4].name"),
])
def test_invalid_views_name_the_field_and_change_nothing(definitions: Definitions, mutate, field: str) -> None:  # noqa: ANN001
    apply_basics(definitions)
    view = mutate(user_view())
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
        definitions.apply_entity(Entity(name="user", join_key="uid", value_type=ValueType.INT64))


def test_feature_sets_apply_get_list_and_refuse_bad_references(definitions: Definitions) -> None:
    apply_basics(definitions)
    definitions.apply_view(user_view(), "a")
    fs = FeatureSet(name="fraud_v1", features=["user_stats:spend_7d", "user_stats:segment"], owner="risk")
    got, outcome = definitions.apply_feature_set(fs)
    assert outcome == "CREATED" and list(got.features) == list(fs.features) and got.create_time.timestamp() > 0
    assert definitions.apply_feature_set(fs)[1] == "UNCHANGED"
    fs = replace(fs, features=[*fs.features, "user_stats:orders_7d"])
    got, outcome = definitions.apply_feature_set(fs)
    assert outcome == "UPDATED" and got.update_time >= got.create_time
    assert list(definitions.get_feature_set("fraud_v1").features) == list(fs.features)
    definitions.apply_feature_set(FeatureSet(name="churn_v1", features=["user_stats:active"]))
    assert [s.name for s in definitions.feature_sets()[0]] == ["churn_v1", "fraud_v1"]
    with pytest.raises(NotFound, match="featureSets/nope"):
        definitions.get_feature_set("nope")
    bad = [
        (FeatureSet(name="Bad Name", features=["user_stats:active"]), InvalidArgument, "feature_set.name"),
        (FeatureSet(name="empty"), InvalidArgument, "feature_set.features"),
        (FeatureSet(name="x", features=["user_stats:active", "nocolon"]), InvalidArgument,
         r"feature_set.features\[1\]"),
        (FeatureSet(name="x", features=["user_stats:active", "user_stats:active"]), InvalidArgument,
         r"feature_set.features\[1\].*twice"),
        (FeatureSet(name="x", features=["user_stats:active", "ghost:f"]), NotFound,
         r"featureViews/ghost.*features\[1\]"),
        (FeatureSet(name="fraud_v1", features=["user_stats:nope"]), InvalidArgument,
         r"feature_set.features\[0\].*no feature 'nope'"),
    ]
    for spec, error, message in bad:
        with pytest.raises(error, match=message):
            definitions.apply_feature_set(spec)
    # nothing of a refused apply was written
    assert [s.name for s in definitions.feature_sets()[0]] == ["churn_v1", "fraud_v1"]
    assert list(definitions.get_feature_set("fraud_v1").features) == list(fs.features)
