"""One trace per job, across the client, the gateway, the worker and its pool process.

The test runs a real OTLP/gRPC receiver; the gateway and the worker export to it as
separate processes, configured only by the standard OTEL_* variables.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from jobmesh import AsyncClient, JobState
from tests.cluster import Cluster, until


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, with the service that sent it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == SERVICE_NAME
                )
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list[tuple[str, trace_pb2.Span]]:
        with self._lock:
            return [(s, span) for s, span in self.spans if span.trace_id == trace_id]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    collected = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collected, f"http://127.0.0.1:{port}"
    server.stop(None)


async def test_a_retried_job_is_one_trace_across_three_processes(
    cluster: Cluster, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    collected, endpoint = receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    gw = cluster.gateway()
    cluster.worker(gw, "w1", "--handlers", "tests.integration.handlers", slots=1)

    # The client's own spans go to the same receiver.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "test-client"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint, insecure=True)))
    tracer = provider.get_tracer("test")
    async with AsyncClient(gw.address) as client:
        with tracer.start_as_current_span("client: submit flaky") as root:
            submitted = await client.submit("flaky", initial_backoff=0.1)
        job = await client.wait(submitted.job.id)
    provider.shutdown()
    assert job.state is JobState.SUCCEEDED
    assert job.attempt == 2

    trace_id = root.get_span_context().trace_id.to_bytes(16, "big")
    # client 1, Submit 1, queue waits 2, attempts 2, worker runs 2, handler steps 2
    await until(lambda: len(collected.of_trace(trace_id)) >= 10)
    spans = collected.of_trace(trace_id)
    by_id = {span.span_id: (service, span) for service, span in spans}

    def parent(span: trace_pb2.Span) -> tuple[str, trace_pb2.Span]:
        return by_id[span.parent_span_id]

    [(_, submit)] = [(s, x) for s, x in spans if x.name == "/jobmesh.v1.JobService/Submit"]
    assert parent(submit)[1].name == "client: submit flaky"
    assert parent(submit)[0] == "test-client"
    waits = [x for s, x in spans if x.name == "queue wait"]
    assert len(waits) == 2
    assert all(parent(w)[1] == submit for w in waits)
    attempts = sorted((x for s, x in spans if x.name.startswith("attempt ")), key=lambda x: x.name)
    assert [a.name for a in attempts] == ["attempt 1", "attempt 2"]
    assert all(parent(a)[1] == submit for a in attempts)
    assert [dict(_attrs(a))["jobmesh.attempt"] for a in attempts] == [1, 2]
    assert any(e.name == "progress" for e in attempts[0].events)

    runs = [(s, x) for s, x in spans if x.name == "run flaky"]
    assert sorted(parent(run)[1].name for _, run in runs) == ["attempt 1", "attempt 2"]
    assert {s for s, _ in runs} == {"jobmesh-worker"}
    steps = [(s, x) for s, x in spans if x.name == "work"]
    assert sorted(parent(step)[1].name for _, step in steps) == ["run flaky", "run flaky"]
    # The step ran in a pool process, the run in the worker's main process: one trace anyway.
    assert {s for s, _ in steps} == {"jobmesh-worker"}
    assert {s for s, x in spans if x.name.startswith(("attempt", "queue"))} == {"jobmesh-gateway"}
    # A handler's own failure is the job's outcome, not a server fault: no error status.
    assert attempts[0].status.code != trace_pb2.Status.STATUS_CODE_ERROR
    assert dict(_attrs(attempts[0]))["jobmesh.error.code"] == "HANDLER_ERROR"


def _attrs(span: trace_pb2.Span) -> Iterator[tuple[str, object]]:
    for a in span.attributes:
        value = a.value
        kind = value.WhichOneof("value")
        yield a.key, getattr(value, kind) if kind else None
