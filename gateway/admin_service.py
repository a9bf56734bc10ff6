"""jobmesh.v1.AdminService: what operators call."""

from __future__ import annotations

import grpc

from gateway.scheduler import Scheduler
from jobmesh.v1 import admin_service_pb2, admin_service_pb2_grpc


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    async def ListWorkers(
        self,
        request: admin_service_pb2.ListWorkersRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> admin_service_pb2.ListWorkersResponse:
        workers = sorted(self._scheduler.sessions, key=lambda s: s.worker_id)
        return admin_service_pb2.ListWorkersResponse(workers=[w.to_proto() for w in workers])
