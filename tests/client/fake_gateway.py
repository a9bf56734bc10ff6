"""A scripted stand-in for the gateway's JobService and AdminService, for client tests.

It runs on grpc's threaded server, so both AsyncClient and the blocking Client can use it.
A submitted job's whole life is written at once: QUEUED, RUNNING, two progress events, then
SUCCEEDED with its inputs as outputs, or FAILED for kind "fail". `break_watches` makes the
next Watch or Run calls fail with UNAVAILABLE after that many events, as a restarting
gateway would.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc

from jobmesh.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)

S = job_pb2.JobState
STATE = job_pb2.JOB_EVENT_TYPE_STATE
PROGRESS = job_pb2.JOB_EVENT_TYPE_PROGRESS


class FakeGateway(
    job_service_pb2_grpc.JobServiceServicer, admin_service_pb2_grpc.AdminServiceServicer
):
    def __init__(self) -> None:
        self.jobs: dict[str, job_pb2.Job] = {}
        self.events: dict[str, list[job_pb2.JobEvent]] = {}
        self.workers: list[admin_service_pb2.Worker] = []
        self.break_watches: list[int] = []
        self.watch_requests: list[job_service_pb2.WatchRequest] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, spec: job_pb2.JobSpec) -> job_pb2.Job:
        """A job as Submit would accept it, with its whole life already in `events`."""
        job_id = f"job-{next(self._ids)}"
        job = job_pb2.Job(id=job_id, spec=spec, state=S.JOB_STATE_QUEUED, attempt=1)
        life = [
            job_pb2.JobEvent(type=STATE, state=S.JOB_STATE_QUEUED),
            job_pb2.JobEvent(type=STATE, state=S.JOB_STATE_RUNNING, worker_id="w1"),
            job_pb2.JobEvent(type=PROGRESS, state=S.JOB_STATE_RUNNING, progress=0.5),
            job_pb2.JobEvent(type=PROGRESS, state=S.JOB_STATE_RUNNING, progress=1.0),
        ]
        end = job_pb2.JobEvent(type=STATE, worker_id="w1")
        if spec.kind == "fail":
            end.state = S.JOB_STATE_FAILED
            end.error.CopyFrom(job_pb2.JobError(code="HANDLER_ERROR", message="boom"))
        else:
            end.state = S.JOB_STATE_SUCCEEDED
            end.result.outputs.update(spec.inputs)
        life.append(end)
        for seq, event in enumerate(life, start=1):
            event.job_id = job_id
            event.seq = seq
            event.attempt = 1
        with self._lock:
            self.jobs[job_id] = job
            self.events[job_id] = life
        return job

    def ended(self, job_id: str) -> job_pb2.Job:
        """The job after its last event."""
        job = job_pb2.Job()
        job.CopyFrom(self.jobs[job_id])
        end = self.events[job_id][-1]
        job.state = end.state
        job.event_seq = end.seq
        job.worker_id = end.worker_id
        if end.HasField("error"):
            job.error.CopyFrom(end.error)
        if end.HasField("result"):
            job.result.CopyFrom(end.result)
        return job

    def _find(self, job_id: str, context: grpc.ServicerContext) -> job_pb2.Job:
        if job_id not in self.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id}")
        return self.ended(job_id)

    def _stream(
        self, job_id: str, after_seq: int, context: grpc.ServicerContext
    ) -> Iterator[job_pb2.JobEvent]:
        with self._lock:
            limit = self.break_watches.pop(0) if self.break_watches else None
        for n, event in enumerate(e for e in self.events[job_id] if e.seq > after_seq):
            if n == limit:
                context.abort(grpc.StatusCode.UNAVAILABLE, "gateway restarting")
            yield event

    def Submit(self, request, context):  # type: ignore[no-untyped-def]
        if not request.spec.kind:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.kind: must not be empty")
        return job_service_pb2.SubmitResponse(
            job=self.add(request.spec), warnings=["no worker serves it yet"]
        )

    def SubmitBatch(self, request, context):  # type: ignore[no-untyped-def]
        return job_service_pb2.SubmitBatchResponse(
            results=[job_service_pb2.SubmitResponse(job=self.add(s)) for s in request.specs]
        )

    def Get(self, request, context):  # type: ignore[no-untyped-def]
        return job_service_pb2.GetResponse(job=self._find(request.job_id, context))

    def Watch(self, request, context):  # type: ignore[no-untyped-def]
        self.watch_requests.append(request)
        self._find(request.job_id, context)
        for event in self._stream(request.job_id, request.after_seq, context):
            yield job_service_pb2.WatchResponse(event=event)

    def Run(self, request, context):  # type: ignore[no-untyped-def]
        job = self.add(request.spec)
        for event in self._stream(job.id, 0, context):
            yield job_service_pb2.RunResponse(event=event)

    def Cancel(self, request, context):  # type: ignore[no-untyped-def]
        job = self._find(request.job_id, context)
        job.state = S.JOB_STATE_CANCELLED
        job.error.CopyFrom(job_pb2.JobError(code="CANCELLED", message=request.reason))
        return job_service_pb2.CancelResponse(job=job)

    def List(self, request, context):  # type: ignore[no-untyped-def]
        ids = sorted(self.jobs, reverse=True)
        start = int(request.page_token or 0)
        size = request.page_size or 50
        page = [self.ended(i) for i in ids[start : start + size]]
        more = start + size < len(ids)
        return job_service_pb2.ListResponse(
            jobs=page, next_page_token=str(start + size) if more else ""
        )

    def ListWorkers(self, request, context):  # type: ignore[no-untyped-def]
        return admin_service_pb2.ListWorkersResponse(workers=self.workers)


def serve(fake: FakeGateway) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    job_service_pb2_grpc.add_JobServiceServicer_to_server(fake, server)
    admin_service_pb2_grpc.add_AdminServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"
