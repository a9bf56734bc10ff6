"""Client settings, and the one place the client reads its environment."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from jobmesh.channels import StrPath, TLSConfig, check_token
from jobmesh.errors import InvalidArgument
from jobmesh.limits import Limits
from jobmesh.settings_fields import parse_bool

DEFAULT_GATEWAY = "127.0.0.1:50051"
# Large enough for the payloads of ordinary jobs; the gateway sets its own limit.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RECEIVED_LIMITS = Limits(max_params_bytes=DEFAULT_MAX_MESSAGE_BYTES, max_params_depth=32)
"""What the client decodes of params and metadata from a gateway: the most any gateway can be
configured to accept (the gateway holds requests to its own, smaller, limits)."""


def parse_address(address: str) -> tuple[str, int]:
    """Splits HOST:PORT (IPv6 hosts in brackets); raises ValueError if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(address: str) -> bool:
    """Whether HOST:PORT names this machine only (127.0.0.0/8, ::1, localhost)."""
    host, _ = parse_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ClientSettings:
    gateway: str = DEFAULT_GATEWAY
    """The gateway's HOST:PORT (`JOBMESH_GATEWAY`)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest message the client sends or receives."""
    inline_limit: int = 1 << 20
    """Inputs larger than this are uploaded in chunks before Submit instead of inlined."""
    limits: Limits = RECEIVED_LIMITS
    """Largest and deepest params or result metadata the client decodes from the gateway."""
    token: str = field(default="", repr=False)
    """Bearer token sent with every call (`JOBMESH_TOKEN`); '' for none."""
    token_file: StrPath | None = None
    """File holding the bearer token, read again when it changes (`JOBMESH_TOKEN_FILE`)."""
    tls: TLSConfig | None = None
    """TLS to the gateway (`JOBMESH_TLS`, `JOBMESH_TLS_CA`...); None: plaintext."""

    def __post_init__(self) -> None:
        try:
            parse_address(self.gateway)
        except ValueError as e:
            raise InvalidArgument(str(e), "gateway") from None
        if self.max_message_bytes <= 0:
            raise InvalidArgument("must be positive", "max_message_bytes")
        if not 0 <= self.inline_limit < self.max_message_bytes:
            raise InvalidArgument("must be between 0 and max_message_bytes", "inline_limit")
        try:
            check_token(self.token)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        if self.token and self.token_file:
            raise InvalidArgument("give a token or a token file, not both", "token_file")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if env is None else env
        return cls(
            gateway=env.get("JOBMESH_GATEWAY") or DEFAULT_GATEWAY,
            token=env.get("JOBMESH_TOKEN", ""),
            token_file=env.get("JOBMESH_TOKEN_FILE") or None,
            tls=tls_from_env(env),
        )


def tls_from_env(env: Mapping[str, str]) -> TLSConfig | None:
    """TLS as the environment asks: `JOBMESH_TLS=true` for the system's roots, or any of
    `JOBMESH_TLS_CA`, `_CERT`, `_KEY`, `_SERVER_NAME`; None when none of them is set."""
    files = {
        name: env[f"JOBMESH_TLS_{name.upper()}"]
        for name in ("ca", "cert", "key", "server_name")
        if env.get(f"JOBMESH_TLS_{name.upper()}")
    }
    try:
        wanted = parse_bool(env["JOBMESH_TLS"]) if env.get("JOBMESH_TLS") else False
    except ValueError as e:
        raise InvalidArgument(str(e), "JOBMESH_TLS") from None
    return TLSConfig(**files) if wanted or files else None
