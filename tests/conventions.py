"""Checks of the platform's list and create conventions through gRPC, shared by the per-service
tests (tests/*/test_conventions_grpc.py): two pages without gaps or repeats, a token of another
query refused, INVALID_ARGUMENT naming the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def refused_field(call: Callable[[], Any]) -> str:
    """Run `call`, which must fail with INVALID_ARGUMENT; the field its BadRequest detail names."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    status = rpc_status.from_call(e.value)
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    raise AssertionError(f"no BadRequest detail in {e.value.details()!r}")


def two_pages(list_call: Callable[..., Any], items: str, key: Callable[[Any], Any], size: int,
              **filters: Any) -> tuple[list, str]:
    """Page through a list of more than `size` (and at most 2 * size) items: exactly two pages,
    the second ending the list, no item twice. Returns (keys of every item, the first token)."""
    first = list_call(page_size=size, **filters)
    assert len(getattr(first, items)) == size and first.next_page_token
    second = list_call(page_size=size, page_token=first.next_page_token, **filters)
    assert 0 < len(getattr(second, items)) <= size and second.next_page_token == ""
    keys = [key(x) for x in (*getattr(first, items), *getattr(second, items))]
    assert len(keys) == len(set(keys))
    return keys, first.next_page_token


def check_page_policy(list_call: Callable[..., Any], token: str, **filters: Any) -> None:
    """page_size outside 0..500 and a token of another query are INVALID_ARGUMENT naming them."""
    assert refused_field(lambda: list_call(page_size=501, **filters)) == "page_size"
    assert refused_field(lambda: list_call(page_size=-1, **filters)) == "page_size"
    assert refused_field(lambda: list_call(page_token=token, **filters)) == "page_token"
    assert refused_field(lambda: list_call(page_token="not-a-token", **filters)) == "page_token"
