"""The server's error taxonomy. Each error carries the gRPC status code name it maps to; the gRPC service maps
them (and decoding.errors.InvalidArgument) to status codes at one boundary, server/service.py."""

from __future__ import annotations

from decoding.errors import InvalidArgument


class ChorusError(Exception):
    code = "INTERNAL"


class NotFound(ChorusError):
    code = "NOT_FOUND"


class FailedPrecondition(ChorusError):
    code = "FAILED_PRECONDITION"


class Unimplemented(ChorusError):
    code = "UNIMPLEMENTED"


class ResourceExhausted(ChorusError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ChorusError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(ChorusError):
    code = "UNAVAILABLE"


class ConfigError(ChorusError):
    """The deployment config is invalid; the server refuses to start."""


def status_code_name(error: BaseException) -> str:
    if isinstance(error, InvalidArgument):
        return "INVALID_ARGUMENT"
    if isinstance(error, ChorusError):
        return error.code
    return "INTERNAL"
