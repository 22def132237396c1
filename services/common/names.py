"""Names shared by every service that refers to registered models: model names and aliases (the
registry stores them; training registers into it, inference resolves them). Each check returns
the value or raises InvalidArgument naming the field."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument, quote

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")


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
