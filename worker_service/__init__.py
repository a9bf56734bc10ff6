"""The jobmesh worker service. Handler modules import from `jobmesh.worker`; these names
stay here too for modules written against them."""

from jobmesh.params import Param
from worker_service.registry import HandlerError, JobCancelled, JobContext, Result, handler

__all__ = ["HandlerError", "JobCancelled", "JobContext", "Param", "Result", "handler"]
