"""Large inputs and outputs: downloaded before a handler runs, uploaded after it.

A job's inputs may be references to blobs on the gateway (`Assign.input_blobs`); the
handler sees them among `ctx.inputs` like any other. Outputs over the inline limit
go back as blobs too, so no result message has to hold them.
"""

from __future__ import annotations

import grpc

from jobmesh import blobs
from jobmesh.channels import TokenSource, open_channel
from jobmesh.v1 import blob_service_pb2_grpc, job_pb2
from worker_service.config import WorkerSettings


class Payloads:
    """Blob transfers over a channel of their own, opened on first use."""

    def __init__(
        self,
        settings: WorkerSettings,
        inline_limit: int = blobs.DEFAULT_INLINE_LIMIT,
        *,
        token: TokenSource | None = None,
    ):
        self._settings = settings
        self._inline_limit = inline_limit
        self._token = settings.token_source() if token is None else token
        self._channel: grpc.aio.Channel | None = None
        self._stub: blob_service_pb2_grpc.BlobServiceAsyncStub | None = None

    def _blobs(self) -> blob_service_pb2_grpc.BlobServiceAsyncStub:
        if self._stub is None:
            limit = self._settings.max_message_bytes
            self._channel = open_channel(
                self._settings.gateway,
                tls=self._settings.tls_config,
                options=[
                    ("grpc.max_send_message_length", limit),
                    ("grpc.max_receive_message_length", limit),
                ],
            )
            self._stub = blob_service_pb2_grpc.BlobServiceStub(self._channel)
        assert self._stub is not None
        return self._stub

    async def fetch(self, refs: dict[str, job_pb2.BlobRef]) -> dict[str, bytes]:
        return (
            await blobs.fetch(self._blobs(), refs, metadata=self._token.metadata()) if refs else {}
        )

    async def offload(self, result: job_pb2.JobResult, budget: int) -> None:
        """Moves the result's outputs over the inline limit into uploaded blobs, then the
        largest of the others until the result is at most `budget` bytes (or all are blobs)."""
        for name in sorted(result.outputs, key=lambda n: len(result.outputs[n]), reverse=True):
            if len(result.outputs[name]) <= self._inline_limit and result.ByteSize() <= budget:
                break
            ref = await blobs.upload(
                self._blobs(), result.outputs[name], metadata=self._token.metadata()
            )
            result.output_blobs[name].CopyFrom(ref)
            del result.outputs[name]

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
