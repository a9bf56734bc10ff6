"""Versions of each kind's params schema: every one a worker declared, kept in the store, and
which attached sessions declare which.

A schema's version is its digest (`jobmesh.params.schema_digest`). Workers of one kind may
declare different versions at once, as in a rolling upgrade: nobody is refused for it.
Submit checks a job's params against the `newest` version for the job's tenant, and the job
records it (`Job.params_schema`); dispatch prefers sessions declaring that version
(`preferred`), since another version's worker may refuse its params. It only prefers them:
a job waiting for one would hold up the jobs queued behind it, those of the new version
too, while the other version's workers sit idle.

Only worker credentials attach, so only they declare schemas; a version is kept with the
tenant of the credential that declared it, and counts only for that tenant's jobs
(`ANY_TENANT`: everyone's), so one tenant's workers never change what another's jobs are
checked against.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError

from gateway.store import ANY_TENANT, JobStore, StoredSchema
from gateway.workers import WorkerSession
from jobmesh.params import Schema, schema_bytes, schema_digest, schema_from_proto
from jobmesh.v1 import dispatcher_pb2

log = logging.getLogger(__name__)
K = TypeVar("K")


@dataclass(frozen=True)
class SchemaVersion:
    """The schema Submit checks a kind's params against, and its version."""

    digest: str
    schema: Schema


class KindSchemas:
    """Every version of each kind's params schema, and which attached sessions declare which."""

    def __init__(self, store: JobStore, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._kept: defaultdict[str, dict[tuple[str, str], StoredSchema]] = defaultdict(dict)
        """Kind -> (tenant, digest) -> the version as stored."""
        self._parsed: dict[str, Schema] = {}
        """Digest -> schema."""
        self._serving: defaultdict[str, set[WorkerSession]] = defaultdict(set)
        """Kind -> the attached sessions serving it, declaring a schema or not."""
        self._declaring: defaultdict[tuple[str, str], set[WorkerSession]] = defaultdict(set)
        """(kind, digest) -> the attached sessions declaring that version."""

    async def load(self) -> None:
        """Takes the versions kept in the store, so that Submit checks params after a
        restart before any worker attaches again."""
        for row in await self._store.schemas():
            try:
                schema = schema_from_proto(dispatcher_pb2.ParamsSchema.FromString(row.schema))
            except (DecodeError, ValueError, TypeError) as e:
                # One damaged row must not keep the gateway from starting.
                log.warning(
                    "params schema %s of kind %s does not parse: %s", row.digest, row.kind, e
                )
                continue
            self._kept[row.kind][row.tenant, row.digest] = row
            self._parsed[row.digest] = schema

    def attach(self, session: WorkerSession, declared: Mapping[str, Schema]) -> None:
        """Notes the schemas an attaching session declares (kind -> schema) and keeps new
        versions in the store."""
        now = self._clock()
        for kind in session.kinds:
            self._serving[kind].add(session)
        for kind, schema in declared.items():
            digest = schema_digest(schema)
            known = self._kept[kind].get((session.tenant, digest))
            row = StoredSchema(
                kind=kind,
                tenant=session.tenant,
                digest=digest,
                schema=schema_bytes(schema),
                first_seen=now if known is None else known.first_seen,
                last_seen=now,
            )
            if known is None:
                log.info(
                    "kind %s: params schema %s first declared, by worker %s (credential %s)",
                    kind,
                    digest,
                    session.worker_id,
                    session.principal,
                )
            self._kept[kind][session.tenant, digest] = row
            self._parsed[digest] = schema
            self._store.declare_schema(row)
            session.schemas[kind] = digest
            self._declaring[kind, digest].add(session)

    def detach(self, session: WorkerSession) -> None:
        """Forgets what a session declared; the versions stay kept."""
        for kind in session.kinds:
            _discard(self._serving, kind, session)
        for kind, digest in session.schemas.items():
            _discard(self._declaring, (kind, digest), session)

    def newest(self, kind: str, tenant: str) -> SchemaVersion | None:
        """What Submit checks `tenant`'s jobs of `kind` against. Among the attached sessions
        serving the kind that may run the tenant's jobs: the version first seen last of
        those they declare (a rollback takes effect as the newer version's workers leave),
        or none if they all declare none (such workers take any params). With no such
        session attached: the version a worker attached declaring last (none if the kind
        never declared one)."""
        kept = self._kept.get(kind)
        if not kept:
            return None  # never declared: no need to look at the sessions
        sessions = [s for s in self._serving.get(kind, ()) if _runs(s, tenant)]
        if sessions:
            declared = [kept[s.tenant, s.schemas[kind]] for s in sessions if kind in s.schemas]
            best = max(declared, key=lambda r: (r.first_seen, r.digest), default=None)
        else:
            best = max(
                (r for r in kept.values() if r.tenant in (ANY_TENANT, tenant)),
                key=lambda r: (r.last_seen, r.first_seen, r.digest),
                default=None,
            )
        return None if best is None else SchemaVersion(best.digest, self._parsed[best.digest])

    def preferred(self, kind: str, tenant: str, digest: str) -> list[WorkerSession] | None:
        """The sessions to pick from for `tenant`'s job of `kind` that schema version
        `digest` accepted: those declaring it that can take the job now; None if none can
        (then any session serving the kind, whose worker checks the params again)."""
        if not digest:
            return None
        declaring = self._declaring.get((kind, digest))
        if not declaring:
            return None
        found = [s for s in declaring if s.can_take(kind) and _runs(s, tenant)]
        return found or None


def _runs(session: WorkerSession, tenant: str) -> bool:
    return session.tenant in (ANY_TENANT, tenant)


def _discard(index: defaultdict[K, set[WorkerSession]], key: K, session: WorkerSession) -> None:
    sessions = index.get(key)
    if sessions is not None:
        sessions.discard(session)
        if not sessions:
            del index[key]
