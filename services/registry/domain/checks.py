"""Checks of request input: model names, aliases, tags and free text; version numbers are
checked as in every service (services.common.limits.check_version, re-exported here). Each
returns the value it checked or raises InvalidArgument naming the field."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument, quote
from services.common.limits import check_version  # noqa: F401 - versions are checked as every service does

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,128}\Z")


def check_name(name: str, field_name: str = "name") -> str:
    if not name:
        raise InvalidArgument(field_name, "is required")
    if not _NAME_RE.match(name):
        raise InvalidArgument(field_name, f"{quote(name)} is not a valid model name (letters, digits, "
                                          "'.', '_', '-'; 1-128 characters; starts with a letter or digit)")
    return name


def check_alias(alias: str, field_name: str = "alias") -> str:
    if not alias:
        raise InvalidArgument(field_name, "is required")
    if not _ALIAS_RE.match(alias):
        raise InvalidArgument(field_name, f"{quote(alias)} is not a valid alias (lower-case letters, digits, "
                                          "'_', '-'; 1-64 characters)")
    if alias == "latest" or re.fullmatch(r"v\d+", alias):
        raise InvalidArgument(field_name, f"{alias!r} is reserved (it would read as a version)")
    return alias


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
