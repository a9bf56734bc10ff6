"""The jobmesh worker service, and what handler modules import from it."""

from worker_service.params import Param
from worker_service.registry import HandlerError, JobCancelled, JobContext, Result, handler

__all__ = ["HandlerError", "JobCancelled", "JobContext", "Param", "Result", "handler"]
