"""One error hierarchy for clients and both services.

Servers raise these; one interceptor turns them into gRPC status codes. Clients
get them back: `from_rpc_error` wraps `grpc.aio.AioRpcError` once, into the same
types. Whatever the SDK raises on purpose is a `JobmeshError`: a file it cannot read or
write is an `InvalidArgument` naming it (`file_error`), a closed client a
`FailedPrecondition`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from jobmesh.jobs import Job


class JobmeshError(Exception):
    """Base of every error jobmesh raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(JobmeshError):
    """The request is malformed; `field` names what is wrong when one field is."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class NotFound(JobmeshError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(JobmeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(JobmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(JobmeshError):
    """No credential, or one the gateway does not know; the message never shows it."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(JobmeshError):
    """A known credential whose roles do not allow the call; the message names the role."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(JobmeshError):
    """A limit was hit: a full queue, a message over the size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(JobmeshError):
    """The gateway cannot be reached or is shutting down; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(JobmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(JobmeshError):
    code = grpc.StatusCode.CANCELLED


class Internal(JobmeshError):
    code = grpc.StatusCode.INTERNAL


class JobFailed(JobmeshError):
    """A job the caller waited for ended FAILED or CANCELLED; `job` is the ended job, when the
    SDK has it."""

    def __init__(
        self, job_id: str, state: str, error_code: str, message: str, job: Job | None = None
    ) -> None:
        super().__init__(f"job {job_id} {state}: [{error_code}] {message}")
        self.job_id = job_id
        self.state = state
        self.error_code = error_code
        self.job = job


def file_error(error: OSError, path: str | os.PathLike[str], field: str) -> InvalidArgument:
    """A file that cannot be read or written, as the InvalidArgument naming `field` and the
    file; raise it `from` the OSError, which keeps the errno."""
    return InvalidArgument(f"{os.fspath(path)!r}: {error.strerror or error}", field)


_BY_CODE: dict[grpc.StatusCode, type[JobmeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> JobmeshError:
    """The typed error for a failed call."""
    # Both grpc.Call and grpc.aio.AioRpcError have code() and details(); neither is the other.
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        code, details = error.code(), error.details()
    else:
        code, details = grpc.StatusCode.UNKNOWN, None
    details = details or code.name
    cls = _BY_CODE.get(code, JobmeshError)
    result = cls(details)
    result.code = code
    return result
