"""One way to dial a gateway, for the SDK, the CLI and workers: plaintext, or TLS verified
against a CA file or the system's roots, with a client certificate for the mTLS port.

Bearer tokens are not channel credentials here: gRPC refuses call credentials on a
plaintext channel, and loopback without TLS is allowed, so callers send the token as plain
`authorization` metadata (`bearer`, or a `TokenSource`'s) on each call.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from jobmesh.errors import InvalidArgument, file_error

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

TOKEN_CHECK_INTERVAL = 1.0
"""Seconds between looks at a token file's mtime, size and inode."""


@dataclass(frozen=True)
class TLSConfig:
    """How a client checks the gateway's certificate, and the certificate it shows itself."""

    ca: StrPath | None = None
    """PEM file of the CAs the gateway's certificate must chain to; None: the system's roots."""
    cert: StrPath | None = None
    """PEM certificate chain of this client, for the gateway's mTLS port (with `key`)."""
    key: StrPath | None = None
    """PEM private key of `cert`."""
    server_name: str | None = None
    """The name the gateway's certificate must carry, if not the host dialed."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument(
                "a client certificate needs its key, and a key its certificate",
                "tls_cert" if self.cert is None else "tls_key",
            )
        if self.server_name is not None and not self.server_name.strip():
            raise InvalidArgument("must not be empty", "tls_server_name")


TLS = TLSConfig | bool | StrPath
"""What `tls=` takes: a TLSConfig; True for the system's roots; a CA file's path; False off."""


def tls_config(value: TLS | None) -> TLSConfig | None:
    """`value` as a TLSConfig, or None for plaintext."""
    if value is None or value is False:
        return None
    if value is True:
        return TLSConfig()
    if isinstance(value, TLSConfig):
        return value
    if isinstance(value, str | os.PathLike):
        return TLSConfig(ca=value)
    raise InvalidArgument(f"expected True, a CA file or a TLSConfig, got {value!r}", "tls")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` ('' for none)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def check_token(token: str) -> None:
    """ValueError unless `token` can travel as metadata; the message never shows it."""
    if token and not (token.isascii() and token.isprintable() and token == token.strip()):
        raise ValueError("the token must be printable ASCII without surrounding spaces")


class TokenSource:
    """The bearer token to send: a fixed one, or the contents of a file read again when it
    changes (a Kubernetes projected service-account token, which kubelet replaces before it
    expires by swapping a symlink).

    The file is looked at on calls, at most once every `interval` seconds, and read again
    when its mtime, size or inode changed. A file that cannot be read or holds no token is an
    InvalidArgument naming `setting` at construction; later, it leaves the last token read in
    use, with one warning until the file can be read again. No message shows the token.
    """

    def __init__(
        self,
        token: str = "",
        path: StrPath | None = None,
        *,
        setting: str = "token_file",
        interval: float = TOKEN_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = path
        self._setting = setting
        self._interval = interval
        self._clock = clock
        self._seen: tuple[int, int, int] | None = None
        self._failing = False
        if path is not None:
            try:
                token = self._read(path)
            except (OSError, ValueError) as e:
                raise InvalidArgument(f"{os.fspath(path)!r}: {_reason(e)}", setting) from None
        self._metadata = bearer(token)
        self._next_look = clock() + interval

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The `authorization` pair to send now (none without a token)."""
        if self._path is not None and (now := self._clock()) >= self._next_look:
            self._next_look = now + self._interval
            self._look(self._path)
        return self._metadata

    def _look(self, path: StrPath) -> None:
        try:
            st = os.stat(path)
            if (st.st_mtime_ns, st.st_size, st.st_ino) != self._seen:
                self._metadata = bearer(self._read(path))
                log.info("%s: read the new token in %r", self._setting, os.fspath(path))
        except (OSError, ValueError) as e:
            if not self._failing:
                log.warning(
                    "%s: %r: %s; the token read before stays in use",
                    self._setting,
                    os.fspath(path),
                    _reason(e),
                )
            self._failing = True
            return
        self._failing = False

    def _read(self, path: StrPath) -> str:
        """The file's token, its signature taken from the file read (so the two match)."""
        with open(path, "rb") as file:
            st = os.fstat(file.fileno())
            token = file.read().decode("utf-8", "replace").strip()
        if not token:
            raise ValueError("the file holds no token")
        check_token(token)
        self._seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        return token


def _reason(error: Exception) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    """The channel credentials of `tls`, its files read now; InvalidArgument naming the
    setting (`tls_ca`, `tls_cert`, `tls_key`) of a file that cannot be read."""
    ca = _read_pem(tls.ca, "tls_ca") if tls.ca is not None else None
    cert = _read_pem(tls.cert, "tls_cert") if tls.cert is not None else None
    key = _read_pem(tls.key, "tls_key") if tls.key is not None else None
    return grpc.ssl_channel_credentials(ca, key, cert)


def open_channel(
    target: str, *, tls: TLSConfig | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel to `target` (HOST:PORT): plaintext without `tls`, else TLS."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    options = list(options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=options)


def _read_pem(path: StrPath, setting: str) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as e:
        raise file_error(e, path, setting) from e
    # grpc would take anything and fail every handshake later with a vaguer reason.
    if b"-----BEGIN " not in data:
        raise InvalidArgument(f"{os.fspath(path)!r} is not a PEM file", setting)
    return data
