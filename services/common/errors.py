"""Domain errors. Each class declares its gRPC status code; the server interceptor maps
them in one place, and the gateway derives the HTTP status from the gRPC code. Messages
reach clients, so they name the field or resource and never carry internals."""

from __future__ import annotations

import grpc


#: The longest message (UTF-8 bytes) and field path an error carries. gRPC sends the message
#: in two headers (grpc-message percent-encoded, grpc-status-details-bin base64 with the field
#: violation's copy); past the peer's header limit (8 KiB by default) the answer itself fails
#: (RESOURCE_EXHAUSTED over gRPC, 502 through Envoy). Request input is quoted short with
#: `quote`; these bounds catch whatever was built without it.
MAX_MESSAGE_BYTES = 1024
MAX_FIELD_CHARS = 256


class StrataError(Exception):
    """Base of every error a client may see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        message = _bounded(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        #: The request field at fault, reported as a google.rpc.BadRequest violation.
        self.field = field if field is None or len(field) <= MAX_FIELD_CHARS else _cut(field, MAX_FIELD_CHARS)


class InvalidArgument(StrataError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        if len(field) > MAX_FIELD_CHARS:
            field = _cut(field, MAX_FIELD_CHARS)
        super().__init__(f"{field}: {problem}", field=field)


class UndecodableRequest(StrataError):
    """The request bytes are not the method's request message (corrupt wire format, invalid
    UTF-8 in a string field): no field to name, the whole request is at fault."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StrataError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StrataError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(StrataError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(StrataError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(StrataError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(StrataError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StrataError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(StrataError):
    """A concurrent change won; the client may retry."""

    code = grpc.StatusCode.ABORTED


#: The longest legal name (a registry model name, 128 characters) with its quotes is never cut.
QUOTE_CHARS = 130


def quote(value: object, limit: int = QUOTE_CHARS, *, bare: bool = False) -> str:
    """`value` as an error message may quote it: repr'd, and cut to `limit` characters with its
    full length named, so an error never echoes unbounded request input (a 1 MiB name would
    make the status itself too large for gRPC and for the gateway). `bare`: a string without
    the quotes around it (control characters still escaped), for a name inside a resource path
    ("endpoints/fraud")."""
    if isinstance(value, str):
        text = repr(value[:limit + 2])  # (+2: room for the quotes, so a cut is always visible)
        if bare:
            text = text[1:-1]
    elif isinstance(value, list | tuple):  # (a shape: only the items that can show are rendered)
        text = str(list(value[:limit]))
        if len(text) > limit:
            return f"{text[:limit]}... ({len(value)} items)"
    else:
        text = str(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size} characters)"


def _cut(text: str, limit: int) -> str:
    return f"{text[:limit - 32]}... ({len(text)} characters)"


def _bounded(message: str, limit: int) -> str:
    """`message` when its UTF-8 form fits `limit` bytes, else its start and its length."""
    if len(message) * 4 <= limit or len(message.encode()) <= limit:
        return message
    tail = f"... ({len(message)} characters)"
    return message.encode()[:limit - len(tail)].decode(errors="ignore") + tail
