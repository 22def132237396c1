"""Domain errors. Each class declares its gRPC status code; the server interceptor maps
them in one place, and the gateway derives the HTTP status from the gRPC code. Messages
reach clients, so they name the field or resource and never carry internals."""

from __future__ import annotations

import grpc


class StrataError(Exception):
    """Base of every error a client may see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The request field at fault, reported as a google.rpc.BadRequest violation.
        self.field = field


class InvalidArgument(StrataError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", field=field)


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
