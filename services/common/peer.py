"""A peer service's gRPC error as this service's own (one mapping for every inter-service call).

The caller of this service did not call the peer: a peer's INVALID_ARGUMENT is the caller's fault
only when the field it names is one the caller gave (`caller_field` maps the peer's field name, ""
when its message names none, to the caller's, or returns None); UNAVAILABLE and DEADLINE_EXCEEDED stay UNAVAILABLE (retry later);
NOT_FOUND stays NOT_FOUND when `what` names something the caller asked for (`not_found`), and
everything else is FAILED_PRECONDITION with the peer's code and message.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, StrataError, Unavailable


def peer_error(e: grpc.RpcError, peer: str, what: str, *, not_found: bool = True,
               caller_field: Callable[[str], str | None] | None = None) -> StrataError:
    """`peer`: "the registry"; `what`: what was asked of it ("models/m/versions/3")."""
    code = e.code()  # type: ignore[attr-defined]
    details = e.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.NOT_FOUND and not_found:
        return NotFound(f"{what} not found in {peer}")
    if code == grpc.StatusCode.INVALID_ARGUMENT and caller_field is not None:
        field, _, problem = details.partition(": ")
        if not problem:  # a message without a field
            field, problem = "", details
        mine = caller_field(field)
        if mine:
            return InvalidArgument(mine, f"{problem} ({peer} refused {what})")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"{peer} did not answer ({code.name}) about {what}: {details}")
    return FailedPrecondition(f"{peer} refused {what}: {code.name} {details}")
