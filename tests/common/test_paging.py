"""The one pagination of every list RPC (services/common/paging.py): the page-size policy, tokens
bound to the list and filters that produced them, pages without gaps or repeats."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, PageRequest, PageToken, page_size


def test_page_size_policy_default_max_and_out_of_range() -> None:
    assert page_size(0) == DEFAULT_PAGE_SIZE == 50
    assert page_size(1) == 1 and page_size(MAX_PAGE_SIZE) == MAX_PAGE_SIZE == 500
    for bad in (-1, MAX_PAGE_SIZE + 1, 10_000):
        with pytest.raises(InvalidArgument) as e:
            page_size(bad)
        assert e.value.field == "page_size"


def _pages(items: list[int], size: int, filters: dict) -> list[list[int]]:
    """Every page of a keyset list over sorted `items`, following the tokens."""
    pages, token = [], ""
    while True:
        page = PageRequest.parse("ListThings", size, token, filters, key=int)
        rows = [i for i in items if page.after is None or i > page.after][:page.limit]
        got, token = page.cut(rows, lambda i: i)
        pages.append(got)
        if not token:
            return pages


def test_pages_cover_the_list_once_without_gaps_or_repeats() -> None:
    items = list(range(0, 70, 2))  # 35 items
    pages = _pages(items, 10, {"q": "x"})
    assert [len(p) for p in pages] == [10, 10, 10, 5]
    assert [i for p in pages for i in p] == items
    assert _pages(items, 35, {}) == [items]  # exactly one page: no token for an empty next page
    assert _pages([], 0, {}) == [[]]


def test_a_token_is_refused_by_another_list_or_other_filters() -> None:
    first = PageRequest.parse("ListThings", 2, "", {"owner": "ann"}, key=int)
    _, token = first.cut([1, 2, 3], lambda i: i)
    assert PageRequest.parse("ListThings", 2, token, {"owner": "ann"}, key=int).after == 2
    for other in (lambda: PageRequest.parse("ListThings", 2, token, {"owner": "bob"}, key=int),
                  lambda: PageRequest.parse("ListOtherThings", 2, token, {"owner": "ann"}, key=int)):
        with pytest.raises(InvalidArgument) as e:
            other()
        assert e.value.field == "page_token"


@pytest.mark.parametrize("token", ["garbage", "!!!", "x" * 5000, PageToken.encode("a-string", {"list": "ListThings"}),
                                   PageToken.encode(True, {"list": "ListThings"})])
def test_a_made_up_token_is_invalid_argument_naming_page_token(token: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        PageRequest.parse("ListThings", 0, token, key=int)  # the position must be of the list's key type
    assert e.value.field == "page_token"


def test_the_page_size_is_checked_before_the_token() -> None:
    with pytest.raises(InvalidArgument) as e:
        PageRequest.parse("ListThings", 501, "garbage")
    assert e.value.field == "page_size"
