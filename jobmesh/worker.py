"""What a handler module imports to serve job kinds:

    from jobmesh.worker import HandlerError, JobContext, Param, Result, handler

`@handler("kind", params=[Param(...)])` registers a function; it gets a `JobContext` (the
job's params, typed by the declared `Param`s, and its inputs) and returns a `Result`, a
dict of metadata or None. Run the module with `jobmesh worker --handlers MODULE`.
"""

from jobmesh.params import Param
from worker_service.registry import HandlerError, JobCancelled, JobContext, Result, handler

__all__ = ["HandlerError", "JobCancelled", "JobContext", "Param", "Result", "handler"]
