"""JSON Web Tokens checked against a JWKS file: how a Kubernetes projected service-account
token (or any OIDC issuer's token) authenticates a caller without a shared secret.

The JWKS file (`--jwks-file`, `{"keys": [...]}`, e.g. `kubectl get --raw /openid/v1/jwks`)
holds the issuer's public keys; it is read again when it changes, so a rotated key set
takes effect within a second. `Verifier.verify` checks a token with PyJWT: the key its
`kid` names, that key's own algorithm (asymmetric only: never `none` or HS*), the issuer,
the audience, `exp` (required) and `nbf`/`iat` if present, with `LEEWAY` for clock skew.
A verified token is remembered for at most `CACHE_SECONDS` (never past its `exp`), so a
worker's calls do not each verify a signature. Which principal a verified token is, is
`gateway.auth`'s business.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.watched import CHECK_INTERVAL, WatchedFile

ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""The signature algorithms a key may have: public-key ones only, so a public key can never
be used as an HMAC secret."""
LEEWAY = 30.0
"""Seconds of clock skew allowed on `exp`, `nbf` and `iat`."""
CACHE_SECONDS = 60.0
"""Longest a verified token is remembered; a changed JWKS file forgets them all."""
CACHE_SIZE = 4096
"""Most tokens remembered (least recently used go first)."""
MIN_RSA_BITS = 2048

_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def looks_like_jwt(token: str) -> bool:
    """Whether `token` has a JWT's shape: three base64url parts (the last may be empty)."""
    return _JWT.fullmatch(token) is not None


class JwksFileError(OSError):
    """The JWKS file cannot be used; an OSError, so a gateway's start reports it in one line."""


class InvalidJwt(Exception):
    """A token that does not verify; the message is a short reason, never the token."""


@dataclass(frozen=True)
class Keys:
    """What one version of the JWKS file says."""

    by_kid: Mapping[str, jwt.PyJWK]


def parse(text: str, source: str = "the JWKS file") -> Keys:
    """The signing keys of JWKS `text`; JwksFileError naming the key at fault. Keys marked
    for encryption (`"use": "enc"`) are left out."""
    try:
        document = json.loads(text)
    except ValueError as e:
        raise JwksFileError(f"{source}: not JSON: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksFileError(f'{source}: must be a JWK set, {{"keys": [...]}}')
    by_kid: dict[str, jwt.PyJWK] = {}
    for i, entry in enumerate(document["keys"], 1):
        where = f"{source}: key #{i}"
        if not isinstance(entry, dict):
            raise JwksFileError(f"{where}: must be an object")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise JwksFileError(f"{where}: needs a kid (tokens name their key by it)")
        where = f"{where} ({kid!r})"
        if entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") == "oct":
            raise JwksFileError(f"{where}: a symmetric key; only public keys are accepted")
        if "d" in entry:  # the private part of an RSA, EC or OKP key
            raise JwksFileError(f"{where}: a private key; the file holds public keys only")
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError as e:
            raise JwksFileError(f"{where}: not a usable key ({_first_line(e)})") from None
        if key.algorithm_name not in ALGORITHMS:
            raise JwksFileError(
                f"{where}: algorithm {key.algorithm_name} is not accepted "
                f"(accepted: {', '.join(sorted(ALGORITHMS))})"
            )
        if isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size < MIN_RSA_BITS:
            raise JwksFileError(f"{where}: an RSA key of fewer than {MIN_RSA_BITS} bits")
        if kid in by_kid:
            raise JwksFileError(f"{where}: another key has this kid")
        by_kid[kid] = key
    if not by_kid:
        raise JwksFileError(f"{source}: holds no signing key")
    return Keys(by_kid)


def load(path: Path) -> Keys:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise JwksFileError(f"cannot read JWKS file {path}: {reason}") from None
    return parse(text, f"JWKS file {path}")


def _first_line(error: Exception) -> str:
    # PyJWT's key errors may quote the whole JWK; a line is enough.
    return str(error).splitlines()[0][:120] if str(error) else type(error).__name__


class JwksFile(WatchedFile[Keys]):
    """The JWKS file's keys, read again when the file changes (`gateway.watched`)."""

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
            what="JWT keys",
            describe=lambda keys: f"auth: {len(keys.by_kid)} JWT keys from {path}",
            interval=interval,
            clock=clock,
        )


@dataclass(frozen=True)
class Verified:
    """A token whose signature, issuer, audience and lifetime were checked."""

    subject: str
    """Its `sub`, e.g. "system:serviceaccount:jobs:image-worker"."""
    claims: Mapping[str, Any]
    expires: float
    """Its `exp`, seconds since the epoch."""


class Verifier:
    """Checks bearer JWTs against the keys of a JWKS file, for one issuer and audience."""

    def __init__(
        self,
        keys: JwksFile,
        *,
        issuer: str,
        audience: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` is wall time (seconds since the epoch), what `exp` is measured in."""
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[Verified, float]] = OrderedDict()
        self._cached_for = keys.value

    def verify(self, token: str) -> Verified:
        """What `token` says, once verified; InvalidJwt with a short reason else."""
        keys = self.keys.current()
        if keys is not self._cached_for:  # a new key set: what the old one verified is gone
            self._cache.clear()
            self._cached_for = keys
        now = self._clock()
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if now < cached[1]:
                self._cache.move_to_end(digest)
                return cached[0]
            del self._cache[digest]
        verified = self._verify(token, keys, now)
        self._cache[digest] = (verified, min(verified.expires, now + CACHE_SECONDS))
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return verified

    def _verify(self, token: str, keys: Keys, now: float) -> Verified:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidJwt("the bearer token is not a well-formed JWT") from None
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidJwt("the JWT names no key (no kid in its header)")
        key = keys.by_kid.get(kid)
        if key is None:
            raise InvalidJwt(f"the JWT's key {kid[:64]!r} is not in the JWKS file")
        try:
            # The key's own algorithm and nothing else: the token's header does not choose.
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                issuer=self.issuer,
                audience=self.audience,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as e:
            raise InvalidJwt(_reason(e, key.algorithm_name)) from None
        subject, expires = claims["sub"], claims["exp"]
        if not isinstance(subject, str) or not subject:
            raise InvalidJwt("the JWT's sub claim must be a non-empty string")
        if not isinstance(expires, int | float) or isinstance(expires, bool):
            raise InvalidJwt("the JWT's exp claim must be a number")  # PyJWT checked it
        return Verified(subject, claims, float(expires))


def _reason(error: jwt.PyJWTError, algorithm: str) -> str:
    """A short reason for a token PyJWT refused; PyJWT's own messages never hold the token
    but may hold claim values, so each reason is said here."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return "the JWT has expired"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "the JWT is not valid yet (nbf)"
    if isinstance(error, jwt.InvalidIssuedAtError):
        return "the JWT's iat claim is not a time in the past"
    if isinstance(error, jwt.InvalidIssuerError):
        return "the JWT's issuer (iss) is not this gateway's --jwt-issuer"
    if isinstance(error, jwt.InvalidAudienceError):
        return "the JWT is not for this gateway's audience (--jwt-audience)"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"the JWT has no {error.claim} claim"
    if isinstance(error, jwt.InvalidAlgorithmError):
        return f"the JWT's algorithm is not its key's ({algorithm})"
    if isinstance(error, jwt.InvalidSignatureError):
        return "the JWT's signature does not verify"
    return "the bearer token is not a well-formed JWT"
