"""Checks of request input: model names, aliases, tags and free text; version numbers are
checked as in every service (services.common.limits.check_version, re-exported here). Each
returns the value it checked or raises InvalidArgument naming the field."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument, quote
from services.common.limits import check_version  # noqa: F401 - versions are checked as every service does
from services.common.names import check_alias, check_name  # noqa: F401 - one rule for every service

TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}\Z")



def check_tags(tags: dict[str, str], field_name: str = "tags") -> dict[str, str]:
    for k, v in tags.items():
        if not TAG_KEY_RE.match(k):
            raise InvalidArgument(f"{field_name}[{quote(k)}]", "tag keys are 1-128 of [A-Za-z0-9_.:/-]")
        if len(v) > 1024:
            raise InvalidArgument(f"{field_name}[{k!r}]", "tag values are at most 1024 characters")
    return dict(tags)


def check_text(value: str, field_name: str, limit: int = 65536) -> str:
    if len(value) > limit:
        raise InvalidArgument(field_name, f"is longer than {limit} characters")
    return value
