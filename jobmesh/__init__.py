"""jobmesh: hand slow or CPU-heavy work to a gateway that runs it on worker replicas.

from jobmesh import Client

with Client() as client:  # $JOBMESH_GATEWAY, else 127.0.0.1:50051
    job = client.wait(client.submit("echo", params={"text": "hi"}).job.id)
    print(job.state, job.result.metadata)
"""

from jobmesh.blocking import Client
from jobmesh.channels import TLSConfig
from jobmesh.client import AsyncClient, Submitted
from jobmesh.codes import Code
from jobmesh.convert import JobRequest, job_spec
from jobmesh.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    JobFailed,
    JobmeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from jobmesh.jobs import (
    Attempt,
    BlobRef,
    EventType,
    Job,
    JobError,
    JobEvent,
    JobResult,
    JobSpec,
    JobState,
    RetryPolicy,
)
from jobmesh.settings import ClientSettings

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Attempt",
    "BlobRef",
    "Cancelled",
    "Client",
    "ClientSettings",
    "Code",
    "DeadlineExceeded",
    "EventType",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "Job",
    "JobError",
    "JobEvent",
    "JobFailed",
    "JobRequest",
    "JobResult",
    "JobSpec",
    "JobState",
    "JobmeshError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "Submitted",
    "TLSConfig",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "job_spec",
]
