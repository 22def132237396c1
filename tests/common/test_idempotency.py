"""Idempotent creates by request id (services/common/idempotency.py), over a service's own
idempotency_keys table: replay, payload mismatch, bounded ids, scope, forget."""

from __future__ import annotations

import pytest
from sqlalchemy import MetaData, create_engine

from services.common.errors import InvalidArgument
from services.common.idempotency import RequestIds, check_request_id, idempotency_table


@pytest.fixture
def ids():  # noqa: ANN201
    metadata = MetaData()
    table = idempotency_table(metadata)
    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    with engine.begin() as c:
        yield c, RequestIds(table)


def test_a_retry_with_the_same_id_and_payload_finds_the_first_result(ids) -> None:  # noqa: ANN001
    c, r = ids
    payload = {"name": "fraud", "tags": {"a": "1"}}
    assert r.lookup(c, "ann", "CreateThing", "req-1", payload) is None
    r.remember(c, "ann", "CreateThing", "req-1", payload, "things/fraud")
    assert r.lookup(c, "ann", "CreateThing", "req-1", {"tags": {"a": "1"}, "name": "fraud"}) == "things/fraud"


def test_the_same_id_with_another_payload_is_invalid_argument_naming_request_id(ids) -> None:  # noqa: ANN001
    c, r = ids
    r.remember(c, "ann", "CreateThing", "req-1", {"name": "fraud"}, "things/fraud")
    with pytest.raises(InvalidArgument) as e:
        r.lookup(c, "ann", "CreateThing", "req-1", {"name": "churn"})
    assert e.value.field == "request_id"


def test_ids_are_scoped_to_principal_and_method_and_optional(ids) -> None:  # noqa: ANN001
    c, r = ids
    r.remember(c, "ann", "CreateThing", "req-1", {"name": "fraud"}, "things/fraud")
    assert r.lookup(c, "bob", "CreateThing", "req-1", {"name": "churn"}) is None
    assert r.lookup(c, "ann", "CreateOther", "req-1", {"name": "churn"}) is None
    r.remember(c, "ann", "CreateThing", "", {"name": "x"}, "things/x")  # no id: nothing kept
    assert r.lookup(c, "ann", "CreateThing", "", {"name": "x"}) is None


def test_forget_lets_a_retry_start_afresh(ids) -> None:  # noqa: ANN001
    c, r = ids
    r.remember(c, "ann", "CreateThing", "req-1", {"name": "fraud"}, "things/fraud")
    r.forget(c, "CreateThing", ["things/fraud"])
    assert r.lookup(c, "ann", "CreateThing", "req-1", {"name": "other"}) is None


@pytest.mark.parametrize("bad", ["x" * 129, "has space", "tab\there", "ünï"])
def test_request_ids_are_bounded(bad: str) -> None:
    assert check_request_id("") == "" and check_request_id("x" * 128) == "x" * 128
    with pytest.raises(InvalidArgument) as e:
        check_request_id(bad)
    assert e.value.field == "request_id"
