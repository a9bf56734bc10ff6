"""OpenTelemetry set-up shared by the gateway, the worker (and its pool processes) and the CLI.

Configured by the standard `OTEL_*` variables. Nothing is exported unless an OTLP
endpoint is given (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
or `otlp_endpoint`); spans are then sent over OTLP/gRPC to a collector, Jaeger or Tempo.
Without one, trace context still travels (so a traced client's trace id reaches the
workers), but no span is recorded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from jobmesh.codes import Code

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_provider: TracerProvider | None = None


_TIMEOUT_VARS = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")


def exporting(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return any(env.get(var) for var in _ENDPOINT_VARS) and env.get("OTEL_SDK_DISABLED") != "true"


def setup(
    default_service_name: str, otlp_endpoint: str = "", export_timeout: float | None = None
) -> TracerProvider | None:
    """Installs a tracer provider exporting over OTLP, if an endpoint is configured.

    `OTEL_SERVICE_NAME` wins over `default_service_name`. `export_timeout` bounds each
    export, retries included, unless `OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT` says otherwise:
    a short-lived command must not wait on a collector that is down. Call once per process.
    """
    global _provider
    if otlp_endpoint:
        os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint)
    if _provider is not None or not exporting():
        return _provider
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    timeout_set = any(os.environ.get(v) for v in _TIMEOUT_VARS)
    exporter = (
        OTLPSpanExporter(timeout=export_timeout)
        if export_timeout is not None and not timeout_set
        else OTLPSpanExporter()
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def enabled() -> bool:
    """Whether a tracer provider is installed (by `setup`, or by the application)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def flush() -> None:
    if _provider is not None:
        _provider.force_flush()


def shutdown() -> None:
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def inject(ctx: Context | None = None) -> dict[str, str]:
    """The W3C trace context of `ctx` (default: the current one), as a plain dict."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


def extract(carrier: Mapping[str, str]) -> Context:
    return propagate.extract(dict(carrier))


def span_context(span: trace.Span) -> dict[str, str]:
    """The W3C trace context with `span` as the parent of whatever continues it."""
    return inject(trace.set_span_in_context(span))


@contextmanager
def attached(carrier: Mapping[str, str]) -> Iterator[None]:
    """Makes the trace context in `carrier` current for the block."""
    token = context.attach(extract(carrier))
    try:
        yield
    finally:
        context.detach(token)


# Attempt failures that are faults of the system rather than outcomes of the job: only
# these mark a span as an error (a handler that rejects its input is not a fault).
FAULT_CODES = frozenset(code.value for code in Code if code.fault)

# Span attribute names.
JOB_ID = "jobmesh.job.id"
JOB_KIND = "jobmesh.job.kind"
ATTEMPT = "jobmesh.attempt"
WORKER_ID = "jobmesh.worker.id"
TENANT = "jobmesh.tenant"
ERROR_CODE = "jobmesh.error.code"
