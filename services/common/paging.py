"""Pagination of every list RPC, one way for every service (AIP-158): `page_size`, `page_token`,
`next_page_token`.

- Page size: 0 means DEFAULT_PAGE_SIZE (50); 1..MAX_PAGE_SIZE (500) as asked; anything else is
  INVALID_ARGUMENT naming page_size (never silently cut: a client that asked for 1000 would
  otherwise take a short page for the last one).
- Page token: opaque to clients, empty on the last page. It carries the keyset position (the
  sort key of the last item returned) and a digest of the list and its filters, so a token is
  only accepted by the list and filters that produced it; any other token, or one whose position
  is not of the list's key type, is INVALID_ARGUMENT naming page_token. Tokens are not secret
  and not signed: a position a client made up only moves where the page starts.

Use: `page = PageRequest.parse("ListEntities", request.page_size, request.page_token,
{filters}, key=str)`; query `page.limit` rows (one more than the page) after `page.after` (None
on the first page) in the list's order; `items, token = page.cut(rows, key_of_row)`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.errors import InvalidArgument
from services.common.fingerprint import fingerprint

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_TOKEN_CHARS = 1024  # a token this service made is far shorter; a longer one is refused unread

T = TypeVar("T")


def page_size(n: int) -> int:
    """The page size a request asks for: 0 -> DEFAULT_PAGE_SIZE; outside 0..MAX_PAGE_SIZE is
    INVALID_ARGUMENT naming page_size."""
    if not 0 <= n <= MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"must be within 0..{MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})")
    return n or DEFAULT_PAGE_SIZE


class PageToken:
    """Opaque keyset-pagination token, bound to the query (a JSON-able dict naming the list and
    its filters) that produced it."""

    @staticmethod
    def encode(after: Any, query: dict) -> str:
        raw = json.dumps({"a": after, "q": fingerprint(query)[:16]}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def decode(token: str, query: dict, key: type | tuple[type, ...] | None = None) -> Any:
        """The position `token` holds (None for ""); INVALID_ARGUMENT naming page_token when the
        token was not made for `query`, or (with `key`) its position is not of that type."""
        if not token:
            return None
        ok = False
        if len(token) <= MAX_TOKEN_CHARS:
            try:
                d = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
                ok = d["q"] == fingerprint(query)[:16] and (
                    key is None or (isinstance(d["a"], key) and not isinstance(d["a"], bool)))
            except (ValueError, KeyError, TypeError, binascii.Error):
                ok = False
        if not ok:
            raise InvalidArgument("page_token", "is not a token returned by this list with these filters")
        return d["a"]


@dataclass(frozen=True)
class PageRequest:
    """One page asked of a list: its size, where it starts and the query its tokens bind to."""

    size: int
    after: Any  # the sort key of the last item of the previous page; None on the first page
    query: dict

    @classmethod
    def parse(cls, list_name: str, size: int, token: str, filters: dict | None = None,
              key: type | tuple[type, ...] | None = None) -> PageRequest:
        """`list_name` (the RPC) and `filters` (every request field that changes what is listed)
        are what a token binds to; `key` the type of the sort key (checked in a token)."""
        query = {"list": list_name, **(filters or {})}
        n = page_size(size)
        return cls(n, PageToken.decode(token, query, key), query)

    @property
    def limit(self) -> int:
        """How many rows to read: one more than the page, to know whether another follows."""
        return self.size + 1

    def cut(self, rows: Sequence[T], key: Callable[[T], Any]) -> tuple[list[T], str]:
        """(this page's rows, next_page_token): the token is empty when no row follows."""
        page = list(rows[:self.size])
        more = len(rows) > self.size
        return page, PageToken.encode(key(page[-1]), self.query) if more and page else ""
