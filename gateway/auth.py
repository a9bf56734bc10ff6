"""Who is calling and what they may call: principals, roles, tenants, the auth file.

A principal is a name, a tenant and roles. A caller proves which one it is with a bearer
token (`authorization: Bearer <token>` metadata), a JWT signed by a key of the JWKS file
(`--jwks-file`, `gateway.jwts`) or, on the mTLS port, with a verified client certificate;
the auth file (`--auth-file`) maps each token's SHA-256, each JWT subject and each
certificate name to a principal. A JWT whose subject no principal has may carry its tenant
and roles as claims. Without either file every caller is `OPEN`, an admin of tenant
default, as a gateway on a laptop has always been. A principal may give its tenant a quota
(`quota = {...}`, `gateway.quotas`); the files are re-read when they change.

`Authenticator.authorize` is the guard the gateway's one interceptor
(`gateway.interceptors.ErrorInterceptor`) runs before every handler: it authenticates the
call, checks the method's roles (`roles_for`) and makes the principal the call's, for
handlers to read with `principal()`. Handlers never look at credentials.
"""

from __future__ import annotations

import contextvars
import hashlib
import re
import time
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from gateway import quotas
from gateway.jwts import InvalidJwt, Verified, Verifier, looks_like_jwt
from gateway.quotas import UNLIMITED, Quota
from gateway.store import ANY_TENANT
from gateway.watched import CHECK_INTERVAL, WatchedFile
from jobmesh.errors import PermissionDenied, Unauthenticated
from jobmesh.v1 import admin_service_pb2, blob_service_pb2, dispatcher_pb2, job_service_pb2

DEFAULT_TENANT = "default"


class Role(StrEnum):
    CLIENT = "client"
    """JobService, and BlobService for its own tenant."""
    WORKER = "worker"
    """Dispatcher/Session, and the blobs of the attempts it holds."""
    ADMIN = "admin"
    """AdminService, and JobService and BlobService for its tenant (every tenant with "*")."""
    SCALER = "scaler"
    """The autoscaler's endpoint only."""


@dataclass(frozen=True)
class Principal:
    """Who a credential says the caller is."""

    name: str
    """Recorded on what it does (a job's `submitted_by`, `cancelled_by`) and in logs."""
    tenant: str
    """The tenant whose jobs and blobs it sees; `ANY_TENANT` ("*") for a worker or admin
    principal of every tenant."""
    roles: frozenset[Role]
    worker_ids: str = ""
    """fnmatch pattern of the worker ids it may attach as; "" for none."""
    certificate: str = ""
    """The client-certificate name (subject CN or a DNS SAN) that authenticates it, if any."""

    def may(self, roles: Collection[Role]) -> bool:
        """Whether it has one of `roles`."""
        return not self.roles.isdisjoint(roles)

    @property
    def home_tenant(self) -> str:
        """The tenant its new jobs and uploads belong to: its own, or default for a
        principal of every tenant."""
        return DEFAULT_TENANT if self.tenant == ANY_TENANT else self.tenant


OPEN = Principal("anonymous", DEFAULT_TENANT, frozenset(Role), worker_ids="*")
"""Every caller when there is no auth file."""

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("jobmesh_principal")


def principal() -> Principal:
    """The principal of the call being handled; Unauthenticated outside a checked call, so
    a handler served without the guard refuses rather than trusts."""
    try:
        return _current.get()
    except LookupError:
        raise Unauthenticated("this call was not authenticated") from None


# --- which roles each method needs ---------------------------------------------

ANY_ROLE = frozenset(Role)
"""Any principal, as long as the call is authenticated."""


def _service(module: Any, name: str) -> str:
    return str(module.DESCRIPTOR.services_by_name[name].full_name)


_SERVICE_ROLES: Mapping[str, frozenset[Role] | None] = {
    _service(job_service_pb2, "JobService"): frozenset({Role.CLIENT, Role.ADMIN}),
    # Workers fetch the inputs of their attempts and upload outputs (gateway.blob_service).
    _service(blob_service_pb2, "BlobService"): frozenset({Role.CLIENT, Role.ADMIN, Role.WORKER}),
    _service(dispatcher_pb2, "Dispatcher"): frozenset({Role.WORKER}),
    _service(admin_service_pb2, "AdminService"): frozenset({Role.ADMIN}),
    # Kubernetes probes carry no token.
    _service(health_pb2, "Health"): None,
    # grpcurl users rely on it; what it shows is the public contract, but only to callers.
    reflection.SERVICE_NAME: ANY_ROLE,
    "grpc.reflection.v1.ServerReflection": ANY_ROLE,
    # KEDA's external scaler, once the gateway serves it.
    "externalscaler.ExternalScaler": frozenset({Role.SCALER}),
}


def roles_for(method: str) -> frozenset[Role] | None:
    """The roles that may call `method` ('/package.Service/Method'), one of them being
    enough; None for a method open to anyone. A service not listed is for admins."""
    service = method.lstrip("/").partition("/")[0]
    return _SERVICE_ROLES.get(service, frozenset({Role.ADMIN}))


def _roles_text(roles: Collection[Role]) -> str:
    names = [role.value for role in Role if role in roles]
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


# --- the auth file ---------------------------------------------------------------


class AuthFileError(OSError):
    """The auth file cannot be used: unreadable, or not a valid list of principals. An
    OSError so that the gateway's start reports it as any file it cannot use: one line."""


@dataclass(frozen=True)
class Principals:
    """What one version of the auth file says."""

    by_token: Mapping[str, Principal]
    """Lowercase hex SHA-256 of a token -> its principal."""
    by_certificate: Mapping[str, Principal]
    """Certificate name -> its principal."""
    count: int
    quotas: Mapping[str, Quota] = field(default_factory=dict)
    """Tenant -> its quota, for the tenants a principal gives one."""
    by_subject: Mapping[str, Principal] = field(default_factory=dict)
    """JWT subject (`sub`) -> its principal."""
    names: frozenset[str] = frozenset()


NONE = Principals({}, {}, 0)
"""Without an auth file (a gateway with only --jwks-file)."""


_ROLE_NAMES = frozenset(role.value for role in Role)
_KEYS = (
    "name",
    "tenant",
    "roles",
    "token_sha256",
    "certificate",
    "jwt_subject",
    "worker_ids",
    "quota",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_NAME = 253  # a DNS name's length; principal and certificate names alike
# "system:serviceaccount:" + a namespace (63) + ":" + a service account name (253).
_MAX_SUBJECT = 512


def _text(value: object, key: str, where: str, limit: int = _MAX_NAME) -> str:
    if not isinstance(value, str):
        raise AuthFileError(f"{where}: {key} must be a string")
    if not value or len(value) > limit or not value.isprintable():
        raise AuthFileError(f"{where}: {key} must be 1 to {limit} printable characters")
    return value


@dataclass(frozen=True)
class _Entry:
    """One [[principal]] of the auth file."""

    principal: Principal
    token_sha256: str
    """'' for none."""
    jwt_subject: str
    """'' for none."""
    quota: Quota | None
    """The quota it gives its tenant, if any."""


def _principal(entry: object, where: str) -> _Entry:
    """What an entry of the file declares."""
    if not isinstance(entry, dict):
        raise AuthFileError(f"{where}: must be a table ([[principal]])")
    if "name" in entry:
        where = f"{where} ({_text(entry['name'], 'name', where)!r})"
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise AuthFileError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
    for key in ("name", "tenant", "roles"):
        if key not in entry:
            raise AuthFileError(f"{where}: {key} is missing")
    name = entry["name"]
    roles_value = entry["roles"]
    if not isinstance(roles_value, list) or not roles_value:
        raise AuthFileError(f"{where}: roles must be a list of {_roles_text(ANY_ROLE)}")
    roles: set[Role] = set()
    for role in roles_value:
        if not isinstance(role, str) or role not in _ROLE_NAMES:
            raise AuthFileError(
                f"{where}: {role!r} is not a role (roles are {_roles_text(ANY_ROLE)})"
            )
        roles.add(Role(role))
    tenant = _text(entry["tenant"], "tenant", where)
    if tenant == ANY_TENANT:
        if Role.CLIENT in roles:
            raise AuthFileError(
                f'{where}: tenant "*" (every tenant) is for worker and admin principals; '
                "a client has a tenant of its own"
            )
    elif not _TENANT.fullmatch(tenant):
        raise AuthFileError(
            f"{where}: tenant {tenant!r} must be letters, digits, '.', '_' or '-' "
            '(at most 64, not starting with a punctuation mark), or "*"'
        )
    token_sha256 = ""
    if "token_sha256" in entry:
        token_sha256 = entry["token_sha256"]
        if not isinstance(token_sha256, str) or not _SHA256.fullmatch(token_sha256.lower()):
            raise AuthFileError(
                f"{where}: token_sha256 must be the token's SHA-256 as 64 hex digits "
                "(never the token itself)"
            )
        token_sha256 = token_sha256.lower()
    certificate = ""
    if "certificate" in entry:
        certificate = _text(entry["certificate"], "certificate", where)
    jwt_subject = ""
    if "jwt_subject" in entry:
        jwt_subject = _text(entry["jwt_subject"], "jwt_subject", where, _MAX_SUBJECT)
    if not token_sha256 and not certificate and not jwt_subject:
        raise AuthFileError(f"{where}: needs token_sha256, certificate or jwt_subject")
    worker_ids = ""
    if "worker_ids" in entry:
        if Role.WORKER not in roles:
            raise AuthFileError(f"{where}: worker_ids is for principals with the worker role")
        worker_ids = _text(entry["worker_ids"], "worker_ids", where)
    elif Role.WORKER in roles and not certificate:
        raise AuthFileError(
            f'{where}: a worker principal needs worker_ids, e.g. "images-*": the worker ids '
            "it may attach as"
        )
    quota = None
    if "quota" in entry:
        if tenant == ANY_TENANT:
            raise AuthFileError(
                f'{where}: a quota is a tenant\'s, and tenant "*" is every tenant: give it '
                "on a principal of the tenant"
            )
        try:
            quota = quotas.parse(entry["quota"])
        except ValueError as e:
            raise AuthFileError(f"{where}: quota: {e}") from None
    found = Principal(name, tenant, frozenset(roles), worker_ids, certificate)
    return _Entry(found, token_sha256, jwt_subject, quota)


def parse(text: str, source: str = "the auth file") -> Principals:
    """The principals TOML `text` declares; AuthFileError naming the principal at fault."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AuthFileError(f"{source}: not TOML: {e}") from None
    extra = sorted(set(document) - {"principal"})
    if extra:
        raise AuthFileError(f"{source}: unknown key {extra[0]!r}; the file holds [[principal]]s")
    entries = document.get("principal", [])
    if not isinstance(entries, list) or not entries:
        raise AuthFileError(f"{source}: declares no [[principal]]")
    by_token: dict[str, Principal] = {}
    by_certificate: dict[str, Principal] = {}
    by_subject: dict[str, Principal] = {}
    names: set[str] = set()
    # The file is per principal, quotas per tenant: a tenant's principals give it one
    # quota, on any of them, or the same on several; two that differ are an error.
    tenant_quotas: dict[str, tuple[Quota, str]] = {}
    for i, entry in enumerate(entries, 1):
        where = f"{source}: principal #{i}"
        declared = _principal(entry, where)
        found, quota = declared.principal, declared.quota
        where = f"{where} ({found.name!r})"
        if found.name in names:
            raise AuthFileError(f"{where}: another principal has this name")
        names.add(found.name)
        if quota is not None:
            given = tenant_quotas.setdefault(found.tenant, (quota, found.name))
            if given[0] != quota:
                raise AuthFileError(
                    f"{where}: its quota differs from the one {given[1]!r} gives tenant "
                    f"{found.tenant!r}; a tenant has one quota: give it on one principal, "
                    "or the same on each"
                )
        for key, value, index in (
            ("token_sha256", declared.token_sha256, by_token),
            ("certificate", found.certificate, by_certificate),
            ("jwt_subject", declared.jwt_subject, by_subject),
        ):
            if not value:
                continue
            if value in index:
                raise AuthFileError(f"{where}: {key} is also {index[value].name!r}'s")
            index[value] = found
    quotas_by_tenant = {tenant: quota for tenant, (quota, _) in tenant_quotas.items()}
    return Principals(
        by_token, by_certificate, len(names), quotas_by_tenant, by_subject, frozenset(names)
    )


def load(path: Path) -> Principals:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise AuthFileError(f"cannot read auth file {path}: {reason}") from None
    return parse(text, f"auth file {path}")


class AuthFile(WatchedFile[Principals]):
    """The auth file's principals, read again when the file changes (`gateway.watched`)."""

    def __init__(
        self,
        path: Path,
        *,
        interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            path,
            load,
            what="principals",
            describe=lambda found: f"auth: {found.count} principals from {path}",
            interval=interval,
            clock=clock,
        )

    @property
    def principals(self) -> Principals:
        """The principals read last (`current()` looks at the file first)."""
        return self.value


# --- authenticating a call -----------------------------------------------------------


def _bearer(context: grpc.aio.ServicerContext) -> str | None:  # type: ignore[type-arg]
    """The call's bearer token, None if it sends none; never put in a message."""
    values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("the call carries more than one authorization header")
    scheme, _, token = str(values[0]).partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
    return token


def _certificate_names(context: grpc.aio.ServicerContext) -> list[str]:  # type: ignore[type-arg]
    """Subject CN, then DNS SANs, of the caller's certificate; empty without one.

    grpc reports a client certificate's names only on a port that requires one and
    verified it (the mTLS port): the main port asks for none.
    """
    found = context.auth_context()
    if found.get("transport_security_type") != [b"ssl"]:
        return []
    names = [*found.get("x509_common_name", ()), *found.get("x509_subject_alternative_name", ())]
    return [name.decode("utf-8", "replace") for name in names if name]


class Authenticator:
    """Turns each call's credential into its principal and checks the method's roles."""

    def __init__(
        self, auth_file: str = "", *, certificates: bool = False, jwts: Verifier | None = None
    ) -> None:
        """`auth_file` "" is none: without it and `jwts` everyone is OPEN. `certificates`: a
        verified client certificate authenticates (the gateway has --tls-client-ca).
        `jwts`: bearer JWTs are checked by it (the gateway has --jwks-file)."""
        self._file = AuthFile(Path(auth_file)) if auth_file else None
        self._certificates = certificates
        self._jwts = jwts

    @property
    def mode(self) -> str:
        """How calls are authenticated, for the gateway's first log line."""
        if self._file is None and self._jwts is None:
            return "auth: none — every caller is an admin of tenant default (no --auth-file)"
        parts = []
        if self._file is not None:
            parts.append(f"{self._file.principals.count} principals from {self._file.path}")
        if self._jwts is not None:
            parts.append(
                f"JWTs of issuer {self._jwts.issuer!r} for audience {self._jwts.audience!r}, "
                f"{len(self._jwts.keys.value.by_kid)} keys from {self._jwts.keys.path}"
            )
        return "auth: " + "; ".join(parts)

    def quota(self, tenant: str) -> Quota:
        """The tenant's quota as the auth file says now; unlimited without one."""
        if self._file is None:
            return UNLIMITED
        return self._file.current().quotas.get(tenant, UNLIMITED)

    def authorize(self, method: str, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        """The interceptor's guard: Unauthenticated or PermissionDenied, else the call's
        principal is set for `principal()`."""
        needed = roles_for(method)
        if needed is None:
            return
        who = self.authenticate(context)
        if not who.may(needed):
            raise PermissionDenied(
                f"a {_roles_text(who.roles)} credential ({who.name!r}) cannot call "
                f"{method.lstrip('/')}: that needs the {_roles_text(needed)} role"
            )
        _current.set(who)

    def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:  # type: ignore[type-arg]
        if self._file is None and self._jwts is None:
            return OPEN
        principals = self._file.current() if self._file is not None else NONE
        token = _bearer(context)
        if token is not None:
            # A lookup by digest, not a comparison with the secret: timing can tell at
            # most how the digest of the caller's own guess falls in a hash table, and
            # a token whose SHA-256 is a stored one takes a preimage. So no
            # hmac.compare_digest.
            found = principals.by_token.get(token_sha256(token))
            if found is not None:
                return found
            if self._jwts is not None and looks_like_jwt(token):
                try:
                    verified = self._jwts.verify(token)
                except InvalidJwt as e:
                    raise Unauthenticated(str(e)) from None
                return _jwt_principal(verified, principals)
            raise Unauthenticated("the bearer token is not one this gateway knows")
        names = _certificate_names(context) if self._certificates else []
        for name in names:
            if name in principals.by_certificate:
                return principals.by_certificate[name]
        if names:
            raise Unauthenticated(f"the client certificate {names[0]!r} names no principal")
        raise Unauthenticated(
            "this gateway needs a credential: a bearer token in the authorization metadata "
            "(the CLI's --token, --token-file, $JOBMESH_TOKEN or $JOBMESH_TOKEN_FILE)"
            + (" or a client certificate on its mTLS port" if self._certificates else "")
        )


def _jwt_principal(verified: Verified, principals: Principals) -> Principal:
    """The principal of a verified JWT: the auth file's whose `jwt_subject` is its `sub`,
    else the one its claims describe (`jobmesh_tenant`, `jobmesh_roles` and, for a worker,
    `jobmesh_worker_ids`), named by its `sub`."""
    subject = verified.subject
    found = principals.by_subject.get(subject)
    if found is not None:
        return found
    claims = verified.claims
    shown = repr(subject[:_MAX_SUBJECT])
    if "jobmesh_tenant" not in claims or "jobmesh_roles" not in claims:
        raise Unauthenticated(
            f"no principal for subject {shown}: no jwt_subject in the auth file is it, and "
            "the JWT has no jobmesh_tenant and jobmesh_roles claims"
        )
    if subject in principals.names:
        # Its name is its identity (a worker's, a blob's uploader): not another's.
        raise Unauthenticated(
            f"the JWT's subject {shown} is the name of a principal of the auth file, "
            "whose jwt_subject it is not"
        )
    entry = {
        "name": subject,
        "tenant": claims["jobmesh_tenant"],
        "roles": claims["jobmesh_roles"],
        "jwt_subject": subject,
    }
    if "jobmesh_worker_ids" in claims:
        entry["worker_ids"] = claims["jobmesh_worker_ids"]
    try:
        return _principal(entry, "the JWT's jobmesh_* claims").principal
    except AuthFileError as e:
        raise Unauthenticated(str(e)) from None


def token_sha256(token: str) -> str:
    """What the auth file's `token_sha256` holds for `token`: `printf %s TOKEN | sha256sum`."""
    return hashlib.sha256(token.encode()).hexdigest()
