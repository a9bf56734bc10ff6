"""Certificates made at test time: a CA per fixture, with trustme, written as PEM files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

# The names a gateway on loopback is dialed by.
LOOPBACK = ("127.0.0.1", "localhost")


class Authority:
    """A certificate authority of one test; `ca_file` is what a client trusts."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name=f"jobmesh tests {name}")
        self.ca_file = self.dir / f"{name}-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._issued = 0

    def issue(self, *names: str, stem: str = "") -> tuple[Path, Path]:
        """A certificate for `names` (default: loopback) and its key, as files."""
        self._issued += 1
        stem = stem or f"{self.name}-{self._issued}"
        cert = self.ca.issue_cert(*(names or LOOPBACK))
        cert_file, key_file = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_file))
        return cert_file, key_file

    def install(self, cert_file: Path, key_file: Path, *names: str) -> None:
        """Replaces the files with a new certificate, each renamed into place whole, as
        cert-manager's volume does."""
        new_cert, new_key = self.issue(*names)
        os.replace(new_key, key_file)
        os.replace(new_cert, cert_file)


@pytest.fixture
def make_authority(tmp_path: Path) -> Callable[[str], Authority]:
    """Makes CAs: `make_authority("clients")`."""
    return lambda name: Authority(tmp_path / "pki", name)


@pytest.fixture
def authority(make_authority: Callable[[str], Authority]) -> Authority:
    """The CA of the gateway's certificate."""
    return make_authority("server")


@pytest.fixture
def server_cert(authority: Authority) -> tuple[Path, Path]:
    """A gateway certificate for loopback and its key, signed by `authority`."""
    return authority.issue(stem="gateway")
