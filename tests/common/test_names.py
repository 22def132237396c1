"""Names that become keys, paths and resource names are matched whole: a trailing newline (which
`$` lets through) is refused like any other bad character, in every service."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.features.definitions import NAME_RE as FEATURE_NAME_RE
from services.inference.endpoints import validate_name as endpoint_name
from services.registry.domain import check_alias, check_name


@pytest.mark.parametrize("check", [check_name, check_alias, endpoint_name])
def test_a_trailing_newline_is_not_part_of_a_valid_name(check) -> None:  # noqa: ANN001
    check("fraud")
    with pytest.raises(InvalidArgument):
        check("fraud\n")


def test_feature_names_are_matched_whole() -> None:
    assert FEATURE_NAME_RE.match("user_stats") and not FEATURE_NAME_RE.match("user_stats\n")
