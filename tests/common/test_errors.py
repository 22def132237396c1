"""What an error may say: request input quoted short (services.common.errors.quote), every
message and field bounded however it was built, and the one bound per kind of request value
(services.common.limits)."""

from __future__ import annotations

import pytest

from services.common.errors import MAX_FIELD_CHARS, MAX_MESSAGE_BYTES, InvalidArgument, NotFound, quote
from services.common.limits import (
    MAX_FILTER_CHARS, MAX_FILTER_TERMS, MAX_VERSION, check_filter, check_filters, check_version,
)

MIB = 1 << 20


def test_quote_keeps_short_input_and_cuts_long_input_naming_its_length() -> None:
    assert quote("user_stats") == "'user_stats'"
    assert quote("a\nb") == "'a\\nb'"  # control characters show as escapes
    assert quote(42) == "42"
    long = quote("x" * MIB)
    assert long.startswith("'xxx") and long.endswith(f"... ({MIB} characters)") and len(long) < 200


def test_quote_bare_names_a_resource_without_quotes() -> None:
    assert f"endpoints/{quote('fraud', bare=True)} not found" == "endpoints/fraud not found"
    assert quote("a\nb", bare=True) == "a\\nb"
    assert quote("y" * MIB, bare=True).startswith("yyy") and len(quote("y" * MIB, bare=True)) < 200


@pytest.mark.parametrize("char", ["x", "\u00e9", "\U0001f600"], ids=["ascii", "2-byte", "4-byte"])
def test_every_error_message_and_field_is_bounded(char: str) -> None:
    # A message built without quote() (an f-string over request input) is cut at the source:
    # gRPC sends it in a header twice (grpc-message, grpc-status-details-bin), and a header
    # over the peer's limit turns the answer into RESOURCE_EXHAUSTED (and a 502 through Envoy).
    err = NotFound(f"endpoints/{char * MIB} not found")
    assert len(err.message.encode()) <= MAX_MESSAGE_BYTES
    assert err.message.startswith(f"endpoints/{char * 10}") and err.message.endswith(f"({MIB + 20} characters)")
    bad = InvalidArgument(f"features[{char * MIB}]", "unknown feature")
    assert len(bad.field) <= MAX_FIELD_CHARS and len(bad.message.encode()) <= MAX_MESSAGE_BYTES
    assert str(bad) == bad.message
    short = InvalidArgument("page_size", "must be within 0..500")
    assert (short.field, short.message) == ("page_size", "page_size: must be within 0..500")


def test_versions_are_bounded_once() -> None:
    assert check_version(MAX_VERSION, "version") == MAX_VERSION == 2**31 - 1
    assert check_version(0, "version", optional=True) == 0
    for bad, optional in ((MAX_VERSION + 1, False), (2**63 - 1, True), (-1, True), (0, False)):
        with pytest.raises(InvalidArgument) as err:
            check_version(bad, "policy.targets[0].version", optional=optional)
        assert err.value.field == "policy.targets[0].version" and str(bad) in err.value.message


def test_filters_are_bounded_once() -> None:
    assert check_filter("a" * MAX_FILTER_CHARS, "query") == "a" * MAX_FILTER_CHARS
    with pytest.raises(InvalidArgument) as err:
        check_filter("a" * 60_000, "query")
    assert err.value.field == "query" and "60000 characters" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        check_filters(["k"] * (MAX_FILTER_TERMS + 1), "tags")
    assert err.value.field == "tags"
    with pytest.raises(InvalidArgument) as err:
        check_filters(["k", "v" * 60_000], "tags")
    assert err.value.field == "tags[1]"


def test_quote_renders_only_the_start_of_a_long_list() -> None:
    assert quote([1, 32]) == "[1, 32]"
    long = quote([7] * 1_000_000)
    assert long.startswith("[7, 7, ") and long.endswith("... (1000000 items)") and len(long) < 200
