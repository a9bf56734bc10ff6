"""Failure codes: what each means, whether it is retried, and whose fault it is.

A `Code` member for each code jobmesh itself puts in a `JobError`; its value is the wire
string (`Code.TIMEOUT == "TIMEOUT"`), so `job.error.code == Code.TIMEOUT` reads as it should.
Handlers may raise `HandlerError` with codes of their own: those are not members, are retried
as the error says, and are never the system's fault. `python -m jobmesh.codes` prints the
table the README shows.
"""

from __future__ import annotations

from enum import StrEnum

from jobmesh.v1 import job_pb2

RETRIED, NOT_RETRIED, AS_RAISED = True, False, None
"""A member's `retryable`: AS_RAISED when whoever reports the error decides."""
SYSTEM, JOB = True, False
"""A member's `fault`: SYSTEM marks tracing spans as errors; JOB (the job's outcome) does not."""


class Code(StrEnum):
    """A failure code, with its meaning, whether it is retried and whose fault it is."""

    _value_: str
    meaning: str
    retryable: bool | None
    """Whether an attempt failing with it is retried; None: as the error says."""
    fault: bool
    """The system's fault (a worker lost, an internal error), not the job's."""

    def __new__(cls, value: str, retryable: bool | None, fault: bool, meaning: str) -> Code:
        member = str.__new__(cls, value)
        member._value_ = value
        member.retryable = retryable
        member.fault = fault
        member.meaning = meaning
        return member

    # Set by the gateway (TIMEOUT by the worker too; the gateway's is a backstop).
    CANCELLED = "CANCELLED", NOT_RETRIED, JOB, "cancelled on request"
    WORKER_LOST = (
        "WORKER_LOST",
        RETRIED,
        SYSTEM,
        "the worker running the attempt went silent or did not come back in time",
    )
    ASSIGN_NOT_ACKNOWLEDGED = (
        "ASSIGN_NOT_ACKNOWLEDGED",
        RETRIED,
        SYSTEM,
        "the worker did not accept the assignment in time",
    )
    TIMEOUT = (
        "TIMEOUT",
        RETRIED,
        JOB,
        "the attempt ran longer than its `start_to_close_timeout`",
    )
    SCHEDULE_TO_START_TIMEOUT = (
        "SCHEDULE_TO_START_TIMEOUT",
        NOT_RETRIED,
        JOB,
        "no worker started the job within its `schedule_to_start_timeout`",
    )
    DEADLINE_EXCEEDED = (
        "DEADLINE_EXCEEDED",
        NOT_RETRIED,
        JOB,
        "the job did not end within its `schedule_to_close_timeout`",
    )
    INVALID_RESULT = (
        "INVALID_RESULT",
        NOT_RETRIED,
        JOB,
        "the handler's result is not one (bad output names; metadata not a JSON object, too large "
        "or too deep)",
    )
    INVALID_PROGRESS = (
        "INVALID_PROGRESS",
        NOT_RETRIED,
        JOB,
        "a progress message longer than the gateway takes",
    )
    INVALID_ERROR = (
        "INVALID_ERROR",
        AS_RAISED,
        JOB,
        "a worker reported an error whose code is empty, too long or unprintable",
    )
    # Set by the worker.
    UNKNOWN_KIND = "UNKNOWN_KIND", NOT_RETRIED, JOB, "the worker has no handler for the kind"
    INVALID_PARAMS = (
        "INVALID_PARAMS",
        NOT_RETRIED,
        JOB,
        "the params do not fit the kind's schema, or the handler refused them",
    )
    HANDLER_ERROR = (
        "HANDLER_ERROR",
        AS_RAISED,
        JOB,
        "the handler raised: an unexpected exception is retried, a `HandlerError` is not "
        "unless it says `retryable=True`",
    )
    MEMORY_LIMIT_EXCEEDED = (
        "MEMORY_LIMIT_EXCEEDED",
        NOT_RETRIED,
        JOB,
        "the job's pool process went over `max_job_memory`",
    )
    RESULT_TOO_LARGE = (
        "RESULT_TOO_LARGE",
        NOT_RETRIED,
        JOB,
        "the result does not fit one message even with its large outputs in blobs",
    )
    # Retried: results are checked against the gateway's limits before they are sent, so
    # this is more likely a gateway restarting in a loop than a poisonous result, and a
    # rerun (bounded by the job's attempts) beats failing a good job for good.
    RESULT_UNDELIVERABLE = (
        "RESULT_UNDELIVERABLE",
        RETRIED,
        JOB,
        "the gateway did not acknowledge the result on several connections in a row",
    )
    WORKER_PROCESS_DIED = (
        "WORKER_PROCESS_DIED",
        RETRIED,
        SYSTEM,
        "the pool process running the handler exited",
    )
    WORKER_SHUTDOWN = (
        "WORKER_SHUTDOWN",
        RETRIED,
        SYSTEM,
        "the worker stopped during the attempt",
    )
    PAYLOAD_TRANSFER_FAILED = (
        "PAYLOAD_TRANSFER_FAILED",
        RETRIED,
        SYSTEM,
        "the worker could not download an input or upload an output blob",
    )
    WORKER_ERROR = (
        "WORKER_ERROR",
        RETRIED,
        SYSTEM,
        "the worker failed around the handler (an internal error)",
    )
    # Set by the built-in handlers.
    FAILED_ON_PURPOSE = (
        "FAILED_ON_PURPOSE",
        AS_RAISED,
        JOB,
        "the `fail` kind did as asked (its `retryable` param decides)",
    )
    MISSING_INPUT = (
        "MISSING_INPUT",
        NOT_RETRIED,
        JOB,
        "an image kind has no `image` input, or a layer names an input that is absent",
    )
    IMAGE_DECODE_ERROR = (
        "IMAGE_DECODE_ERROR",
        NOT_RETRIED,
        JOB,
        "the input is not an image that can be read",
    )
    UNSUPPORTED_FORMAT = (
        "UNSUPPORTED_FORMAT",
        NOT_RETRIED,
        JOB,
        "the input's format is not one the image kinds read",
    )
    IMAGE_TOO_LARGE = (
        "IMAGE_TOO_LARGE",
        NOT_RETRIED,
        JOB,
        "the image, read or produced, is over `max_image_pixels` or the worker's memory",
    )
    IMAGE_PROCESS_ERROR = (
        "IMAGE_PROCESS_ERROR",
        NOT_RETRIED,
        JOB,
        "Pillow failed processing or encoding the image",
    )

    def error(self, message: str, *, retryable: bool | None = None) -> job_pb2.JobError:
        """A `JobError` with this code, retried as the member says.

        `retryable` is given for a member retried AS_RAISED, and only then.
        """
        if (self.retryable is None) == (retryable is None):
            raise TypeError(
                f"{self.value}: pass retryable"
                if retryable is None
                else f"{self.value}: retryable is {self.retryable}, always"
            )
        flag = self.retryable if retryable is None else retryable
        return job_pb2.JobError(code=self.value, message=message, retryable=bool(flag))


def error(code: str, message: str, retryable: bool) -> job_pb2.JobError:
    """A `JobError` with a code that carries its own flag: a handler's, or a worker's report."""
    return job_pb2.JobError(code=str(code), message=message, retryable=retryable)


def markdown_table() -> str:
    """The codes as the README's Markdown table."""
    retried = {True: "yes", False: "no", None: "as the error says"}
    rows = [
        "| code | retried | fault | meaning |",
        "| --- | --- | --- | --- |",
        *(
            f"| `{c.value}` | {retried[c.retryable]} | {'system' if c.fault else 'job'} "
            f"| {c.meaning} |"
            for c in Code
        ),
    ]
    return "\n".join(rows)
