"""Keyset pagination: the page-size policy and opaque page tokens bound to their query."""

from __future__ import annotations

import base64
import json
from typing import Any

from services.common.errors import InvalidArgument

from .fingerprint import fingerprint

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50


class PageToken:
    """Opaque keyset-pagination token, bound to the query that produced it so a token is
    never replayed against a different filter."""

    @staticmethod
    def encode(after: Any, query: dict) -> str:
        raw = json.dumps({"a": after, "q": fingerprint(query)[:16]}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(token: str, query: dict) -> Any:
        if not token:
            return None
        try:
            d = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            ok = d["q"] == fingerprint(query)[:16]
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise InvalidArgument("page_token", "is not a token returned by this query")
        return d["a"]


def page_size(n: int) -> int:
    if n < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(n or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
