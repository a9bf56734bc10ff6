"""The gateway's TLS credentials, whose files are read again when they change.

cert-manager (or anyone) rotates a certificate by replacing its files; a new connection then
gets the new certificate and the gateway keeps running. grpc asks `CertificateFiles.fetch`
at each handshake; it looks at the files' size and modification time and reads them only
when these changed. A file caught half-written, or a certificate that does not match its key
yet, keeps the previous certificate in use: one warning, and another try once the files
change again.

grpcio can either ignore client certificates or require them, not ask for one and take its
absence: the port of `--listen` does not ask (callers authenticate by token), the port of
`--mtls-listen` requires one signed by `--tls-client-ca`.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from gateway.config import GatewaySettings

log = logging.getLogger("gateway")

Signature = tuple[tuple[int, int, int], ...]


class CertificateFiles:
    """A certificate chain, its key and, for a port that requires client certificates, the
    CAs those must chain to: PEM files, read by `load` and again by `fetch` after a change."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self._paths = {"tls_cert": cert, "tls_key": key}
        if client_ca:
            self._paths["tls_client_ca"] = client_ca
        self._lock = threading.Lock()  # grpc may fetch from several threads at once
        self._seen: Signature | None = None
        self._warned = ""

    def load(self) -> grpc.ServerCertificateConfiguration:
        """The files' configuration now; OSError naming the setting of a file that cannot be
        read or used (a key that does not match the certificate, a file that is not PEM)."""
        before = self._signature()
        config = self._read()
        self._seen = before
        return config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate fetcher: a new configuration if the files changed since they
        were last read, else None (grpc keeps the one it has)."""
        with self._lock:
            try:
                now = self._signature()
            except OSError as exc:  # a file missing while it is replaced: try at the next one
                self._warn(exc)
                return None
            if now == self._seen:
                return None
            try:
                config = self._read()
            except OSError as exc:
                self._seen = now  # not read again until the files change again
                self._warn(exc)
                return None
            try:
                if self._signature() != now:
                    return None  # changed while being read: read again at the next handshake
            except OSError:
                return None
            self._seen = now
            self._warned = ""
            log.info("TLS certificate read again from %s", self._paths["tls_cert"])
            return config

    def _warn(self, exc: OSError) -> None:
        """One warning per problem, however many handshakes meet it."""
        if str(exc) != self._warned:
            self._warned = str(exc)
            log.warning("%s; keeping the TLS certificate in use", exc)

    def _signature(self) -> Signature:
        """What changes when any file is replaced or rewritten (a rename swaps the inode)."""
        signature = []
        for setting, path in self._paths.items():
            try:
                st = os.stat(path)
            except OSError as exc:
                raise OSError(f"--{setting.replace('_', '-')} {path}: {_reason(exc)}") from None
            signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(signature)

    def _read(self) -> grpc.ServerCertificateConfiguration:
        pems = {setting: _read_file(setting, path) for setting, path in self._paths.items()}
        _check(self._paths, pems)
        return grpc.ssl_server_certificate_configuration(
            [(pems["tls_key"], pems["tls_cert"])], root_certificates=pems.get("tls_client_ca")
        )


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """TLS credentials of one port, with the files read again when they change; with
    `client_ca`, a client certificate signed by it is required. OSError if the files cannot
    be used now."""
    files = CertificateFiles(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.load(),
        files.fetch,  # type: ignore[arg-type]  # None keeps the configuration; grpc-stubs omit it
        require_client_authentication=bool(client_ca),
    )


def _read_file(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise OSError(f"--{setting.replace('_', '-')} {path}: {_reason(exc)}") from None


def _check(paths: dict[str, str], pems: dict[str, bytes]) -> None:
    """OSError unless the certificate and key are PEM and match, and the client CAs are PEM.

    grpc takes any bytes and would fail every handshake later. The ssl module checks them;
    it reads the certificate and key from their paths, so `fetch` compares the files'
    signature before and after to know it checked what it read.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(paths["tls_cert"], paths["tls_key"], password=_no_password)
    except (OSError, ValueError) as exc:
        raise OSError(
            f"--tls-cert {paths['tls_cert']} and --tls-key {paths['tls_key']}: "
            f"not a PEM certificate and its unencrypted key ({_reason(exc)})"
        ) from None
    if "tls_client_ca" in pems:
        try:
            context.load_verify_locations(cadata=pems["tls_client_ca"].decode("ascii"))
        except (ssl.SSLError, ValueError) as exc:
            raise OSError(
                f"--tls-client-ca {paths['tls_client_ca']}: not PEM certificates ({_reason(exc)})"
            ) from None


def _no_password() -> bytes:
    raise ValueError("the key is encrypted")


def _reason(exc: BaseException) -> str:
    """What went wrong, without OpenSSL's library and source line."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    text = re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", text)
    return text[:1].lower() + text[1:] if text[1:2].islower() else text  # not "pEM"


def port_credentials(
    settings: GatewaySettings,
) -> tuple[grpc.ServerCredentials | None, grpc.ServerCredentials | None]:
    """The credentials of `--listen` (None: plaintext) and of `--mtls-listen` (None: not
    served); OSError if the files cannot be used now."""
    if not settings.tls:
        return None, None
    main = server_credentials(settings.tls_cert, settings.tls_key)
    if not settings.mtls_listen:
        return main, None
    return main, server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
