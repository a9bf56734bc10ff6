"""jobmesh: hand slow or CPU-heavy work to a gateway that runs it on worker replicas.

from jobmesh import Client

with Client("127.0.0.1:50051") as client:
    job = client.wait(client.submit("echo", params={"text": "hi"}).job.id)
"""

from jobmesh.blocking import Client
from jobmesh.client import AsyncClient, Submitted
from jobmesh.codes import Code
from jobmesh.convert import job_spec
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
    ResourceExhausted,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "Code",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "JobFailed",
    "JobmeshError",
    "NotFound",
    "ResourceExhausted",
    "Submitted",
    "Unavailable",
    "__version__",
    "job_spec",
]
