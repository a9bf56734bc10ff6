"""JWTs checked against a JWKS file (`--jwks-file`): Kubernetes service-account tokens and
other issuers' tokens as credentials.

Keys are made in the test with `cryptography` (RSA and EC) and tokens signed with PyJWT;
forgeries (`alg: none`, HS256 keyed with the public key) are put together by hand. The
JWKS file, the verifier and the mapping to principals are tested without processes; a
real gateway shows a worker attaching with a service-account-like token, clients
submitting, each kind of bad token refused, and the JWKS file rotated under it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway import jwts
from gateway.auth import Authenticator, AuthFile, Role
from gateway.config import GatewaySettings
from gateway.jwts import InvalidJwt, JwksFile, JwksFileError, Verifier, looks_like_jwt
from jobmesh import AsyncClient, JobState
from jobmesh.errors import Unauthenticated
from jobmesh.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from tests.cluster import ROOT, Cluster, Gateway, until
from tests.security.auth_fixtures import ADMIN, bearer, first_log_line, refused, until_accepted
from tests.security.test_workers import workers

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "jobmesh"
WORKER_SUBJECT = "system:serviceaccount:jobs:image-worker"
CLIENT_SUBJECT = "system:serviceaccount:team-a:api"

AUTH_FILE = (
    ADMIN.toml()
    + f"""
[[principal]]
name = "image-workers"
tenant = "*"
roles = ["worker"]
jwt_subject = "{WORKER_SUBJECT}"
worker_ids = "images-*"

[[principal]]
name = "team-a-api"
tenant = "team-a"
roles = ["client"]
jwt_subject = "{CLIENT_SUBJECT}"
"""
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """The signing keys of one test's token issuer, by kid, and tokens signed with them."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {}

    def rsa(self, kid: str, bits: int = 2048) -> str:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return kid

    def ec(self, kid: str) -> str:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())
        return kid

    def jwk(self, kid: str) -> dict[str, Any]:
        """The public JWK of `kid`, as `kubectl get --raw /openid/v1/jwks` shows one."""
        key = self.keys[kid]
        if isinstance(key, rsa.RSAPrivateKey):
            found = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            found["alg"] = "RS256"
        else:
            found = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            found["alg"] = "ES256"
        return {**found, "kid": kid, "use": "sig"}

    def jwks(self, *kids: str) -> str:
        return json.dumps({"keys": [self.jwk(kid) for kid in kids or self.keys]})

    def write(self, path: Path, *kids: str) -> Path:
        """Writes the JWKS of `kids` (default: all), renamed into place whole as a
        ConfigMap volume does."""
        new = path.with_suffix(".new")
        new.write_text(self.jwks(*kids))
        os.replace(new, path)
        return path

    def token(
        self,
        kid: str,
        subject: str = WORKER_SUBJECT,
        *,
        issuer: str = ISSUER,
        audience: str | tuple[str, ...] = (AUDIENCE,),
        lifetime: float = 600.0,
        signed_by: str = "",
        **claims: Any,
    ) -> str:
        """A token naming key `kid`, signed with it (or with the key `signed_by`)."""
        key = self.keys[signed_by or kid]
        now = int(time.time())
        payload = {
            "iss": issuer,
            "sub": subject,
            "aud": list(audience) if not isinstance(audience, str) else audience,
            "iat": now,
            "nbf": now,
            "exp": int(now + lifetime),
            "kubernetes.io": {"namespace": "jobs", "serviceaccount": {"name": "image-worker"}},
            **claims,
        }
        algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(payload, key, algorithm=algorithm, headers={"kid": kid})

    def public_pem(self, kid: str) -> bytes:
        return (
            self.keys[kid]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def forged(header: Mapping[str, Any], payload: Mapping[str, Any], secret: bytes | None) -> str:
    """A token put together by hand: unsigned (`secret` None) or HMAC-SHA256 with `secret`."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    if secret is None:
        return signing_input + "."
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + _b64(signature)


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


@pytest.fixture
def issuer() -> Issuer:
    made = Issuer()
    made.rsa("rsa-1")
    made.ec("ec-1")
    return made


# --- the JWKS file, without processes ------------------------------------------------


def test_a_jwks_file_holds_rsa_and_ec_signing_keys_by_kid(issuer: Issuer) -> None:
    document = json.loads(issuer.jwks())
    document["keys"].append({**issuer.jwk("rsa-1"), "kid": "enc-1", "use": "enc"})
    keys = jwts.parse(json.dumps(document))
    assert set(keys.by_kid) == {"rsa-1", "ec-1"}  # an encryption key is left out
    assert keys.by_kid["rsa-1"].algorithm_name == "RS256"
    assert keys.by_kid["ec-1"].algorithm_name == "ES256"


def test_a_bad_jwks_file_is_refused_naming_the_key_at_fault(issuer: Issuer) -> None:
    rsa_key = issuer.jwk("rsa-1")
    private = json.loads(RSAAlgorithm.to_jwk(issuer.keys["rsa-1"]))
    short = Issuer()
    short.rsa("short", bits=1024)
    k1 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256K1()).public_key(), as_dict=True)
    cases = [
        ("{", "not JSON"),
        ('{"kes": []}', 'must be a JWK set, {"keys": [...]}'),
        ('{"keys": []}', "holds no signing key"),
        ('{"keys": [1]}', "key #1: must be an object"),
        (json.dumps({"keys": [{**rsa_key, "kid": ""}]}), "key #1: needs a kid"),
        (
            json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}),
            "key #1 ('hmac'): a symmetric key",
        ),
        (
            json.dumps({"keys": [{**private, "kid": "private"}]}),
            "key #1 ('private'): a private key",
        ),
        (json.dumps({"keys": [rsa_key, rsa_key]}), "key #2 ('rsa-1'): another key has this kid"),
        (short.jwks(), "key #1 ('short'): an RSA key of fewer than 2048 bits"),
        (
            json.dumps({"keys": [{**k1, "kid": "k1"}]}),
            "key #1 ('k1'): algorithm ES256K is not accepted",
        ),
        (
            json.dumps({"keys": [{**rsa_key, "alg": "RSA1_5"}]}),
            "key #1 ('rsa-1'): not a usable key",
        ),
        (
            json.dumps({"keys": [{**rsa_key, "kty": "RSB"}]}),
            "key #1 ('rsa-1'): not a usable key",
        ),
    ]
    for text, message in cases:
        with pytest.raises(JwksFileError) as raised:
            jwts.parse(text, "jwks.json")
        assert str(raised.value).startswith("jwks.json: "), text
        assert message in str(raised.value), text


def test_a_jwt_is_told_from_an_opaque_token_by_its_shape() -> None:
    assert looks_like_jwt("eyJh.eyJz.c2ln")
    assert looks_like_jwt("eyJh.eyJz.")  # unsigned: still verified, and refused
    assert not looks_like_jwt("5e884898da28047151d0e56f8dc62927")
    assert not looks_like_jwt("a.b")
    assert not looks_like_jwt("a.b.c.d")
    assert not looks_like_jwt("a.b+c.d")


# --- the verifier, without processes -------------------------------------------------


def verifier(path: Path, clock: list[float] | None = None) -> Verifier:
    look = [0.0] if clock is None else clock
    keys = JwksFile(path, clock=lambda: look[0])
    return Verifier(keys, issuer=ISSUER, audience=AUDIENCE, clock=lambda: time.time() + look[0])


def test_a_valid_token_of_either_key_verifies(issuer: Issuer, tmp_path: Path) -> None:
    check = verifier(issuer.write(tmp_path / "jwks.json"))
    for kid in ("rsa-1", "ec-1"):
        token = issuer.token(kid)
        verified = check.verify(token)
        assert verified.subject == WORKER_SUBJECT
        assert verified.expires == claims_of(token)["exp"]
        assert verified.claims["kubernetes.io"]["namespace"] == "jobs"
    # An audience among several, as Kubernetes lists them; clock skew within the leeway.
    assert check.verify(issuer.token("rsa-1", audience=["vault", AUDIENCE])).subject
    assert check.verify(issuer.token("rsa-1", lifetime=-10)).subject


def test_every_bad_token_is_refused_with_a_short_reason(issuer: Issuer, tmp_path: Path) -> None:
    check = verifier(issuer.write(tmp_path / "jwks.json", "rsa-1", "ec-1"))
    stranger = Issuer()
    stranger.rsa("rsa-1")  # the same kid, another key: not the issuer's
    stranger.rsa("rsa-9")
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": WORKER_SUBJECT, "aud": AUDIENCE, "exp": now + 600}
    public_pem = issuer.public_pem("rsa-1")
    cases = {
        "the JWT has expired": issuer.token("rsa-1", lifetime=-120),
        "the JWT is not valid yet (nbf)": issuer.token("rsa-1", nbf=now + 600),
        "the JWT is not for this gateway's audience": issuer.token("rsa-1", audience="vault"),
        "the JWT's issuer (iss) is not this gateway's --jwt-issuer": issuer.token(
            "rsa-1", issuer="https://evil.example"
        ),
        "the JWT's signature does not verify": stranger.token("rsa-1"),
        "the JWT's key 'rsa-9' is not in the JWKS file": stranger.token("rsa-9"),
        "the JWT names no key (no kid in its header)": jwt.encode(
            payload, issuer.keys["rsa-1"], algorithm="RS256"
        ),
        "the JWT has no exp claim": jwt.encode(
            {k: v for k, v in payload.items() if k != "exp"},
            issuer.keys["rsa-1"],
            algorithm="RS256",
            headers={"kid": "rsa-1"},
        ),
        "the JWT has no sub claim": jwt.encode(
            {k: v for k, v in payload.items() if k != "sub"},
            issuer.keys["ec-1"],
            algorithm="ES256",
            headers={"kid": "ec-1"},
        ),
        # Forgeries: unsigned, and HMAC keyed with the public key (the classic confusion).
        "the JWT's algorithm is not its key's (RS256)": forged(
            {"alg": "none", "kid": "rsa-1"}, payload, None
        ),
        "the JWT's algorithm is not its key's (ES256)": forged(
            {"alg": "HS256", "kid": "ec-1"}, payload, issuer.public_pem("ec-1")
        ),
        "the bearer token is not a well-formed JWT": "eyJub3Q.anNvbg.c2ln",
    }
    hs256 = forged({"alg": "HS256", "kid": "rsa-1"}, payload, public_pem)
    for reason, token in [*cases.items(), ("its key's (RS256)", hs256)]:
        with pytest.raises(InvalidJwt) as raised:
            check.verify(token)
        assert reason in str(raised.value), token
        assert token not in str(raised.value)


def test_a_verified_token_is_remembered_until_its_expiry_or_a_minute(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [0.0]
    check = verifier(issuer.write(tmp_path / "jwks.json"), clock)
    decoded: list[str] = []
    decode = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    long_lived = issuer.token("rsa-1", lifetime=3600)
    short_lived = issuer.token("ec-1", lifetime=20)
    for _ in range(3):
        check.verify(long_lived)
        check.verify(short_lived)
    assert decoded == [long_lived, short_lived]
    clock[0] = 30.0  # short_lived expired (its leeway still lets it verify)
    check.verify(long_lived)
    check.verify(short_lived)
    assert decoded == [long_lived, short_lived, short_lived]
    clock[0] = 61.0
    check.verify(long_lived)
    assert decoded[-1] == long_lived
    assert len(decoded) == 4


def test_a_new_jwks_file_is_in_force_at_once_and_a_broken_edit_changes_nothing(
    issuer: Issuer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [0.0]
    path = issuer.write(tmp_path / "jwks.json", "rsa-1")
    check = verifier(path, clock)
    old = issuer.token("rsa-1")
    assert check.verify(old).subject == WORKER_SUBJECT  # and remembered

    issuer.ec("ec-2")
    issuer.write(path, "ec-2")
    clock[0] += 1.0
    assert check.verify(issuer.token("ec-2")).subject == WORKER_SUBJECT
    with pytest.raises(InvalidJwt, match="'rsa-1' is not in the JWKS file"):
        check.verify(old)  # what the old set verified is forgotten with it

    path.write_text(issuer.jwks("ec-2").replace('"kty"', '"kyt"'))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            clock[0] += 1.0
            assert check.verify(issuer.token("ec-2")).subject == WORKER_SUBJECT
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "key #1 ('ec-2'): not a usable key" in warning
    assert "the JWT keys read before stay in force" in warning


# --- from a verified token to a principal, without processes -----------------------


class Call:
    """What `Authenticator.authenticate` reads of a call: its metadata, no certificate."""

    def __init__(self, token: str) -> None:
        self.metadata = bearer(token)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def authenticator(issuer: Issuer, tmp_path: Path, auth: str | None = AUTH_FILE) -> Authenticator:
    auth_file = ""
    if auth is not None:
        (tmp_path / "auth.toml").write_text(auth)
        auth_file = str(tmp_path / "auth.toml")
    check = verifier(issuer.write(tmp_path / "jwks.json"))
    return Authenticator(auth_file, jwts=check)


def test_a_subject_is_the_auth_files_principal_else_the_one_its_claims_describe(
    issuer: Issuer, tmp_path: Path
) -> None:
    auth = authenticator(issuer, tmp_path)
    worker = auth.authenticate(Call(issuer.token("rsa-1")))  # type: ignore[arg-type]
    assert (worker.name, worker.tenant, worker.roles, worker.worker_ids) == (
        "image-workers",
        "*",
        {Role.WORKER},
        "images-*",
    )
    # The auth file wins over claims; opaque tokens still work beside JWTs.
    claimed = issuer.token("ec-1", CLIENT_SUBJECT, jobmesh_tenant="x", jobmesh_roles=["admin"])
    assert auth.authenticate(Call(claimed)).name == "team-a-api"  # type: ignore[arg-type]
    assert auth.authenticate(Call(ADMIN.token)).name == "ops"  # type: ignore[arg-type]

    ci = issuer.token("ec-1", "ci-bot", jobmesh_tenant="team-c", jobmesh_roles=["client"])
    found = auth.authenticate(Call(ci))  # type: ignore[arg-type]
    assert (found.name, found.tenant, found.roles) == ("ci-bot", "team-c", {Role.CLIENT})
    fleet = issuer.token(
        "rsa-1",
        "fleet",
        jobmesh_tenant="team-c",
        jobmesh_roles=["worker"],
        jobmesh_worker_ids="fleet-*",
    )
    assert auth.authenticate(Call(fleet)).worker_ids == "fleet-*"  # type: ignore[arg-type]

    refusals = {
        "no principal for subject 'system:serviceaccount:jobs:other'": issuer.token(
            "rsa-1", "system:serviceaccount:jobs:other"
        ),
        "the JWT's subject 'ops' is the name of a principal of the auth file": issuer.token(
            "rsa-1", "ops", jobmesh_tenant="*", jobmesh_roles=["admin"]
        ),
        "the JWT's jobmesh_* claims ('ci-bot'): 'root' is not a role": issuer.token(
            "rsa-1", "ci-bot", jobmesh_tenant="team-c", jobmesh_roles=["root"]
        ),
        'tenant "*" (every tenant) is for worker and admin principals': issuer.token(
            "rsa-1", "ci-bot", jobmesh_tenant="*", jobmesh_roles=["client"]
        ),
        "the bearer token is not one this gateway knows": "not-a-jwt",
    }
    for reason, token in refusals.items():
        with pytest.raises(Unauthenticated) as raised:
            auth.authenticate(Call(token))  # type: ignore[arg-type]
        assert reason in raised.value.message


def test_without_an_auth_file_only_claims_name_principals(issuer: Issuer, tmp_path: Path) -> None:
    auth = authenticator(issuer, tmp_path, auth=None)
    assert auth.mode == (
        f"auth: JWTs of issuer {ISSUER!r} for audience {AUDIENCE!r}, 2 keys from "
        f"{tmp_path / 'jwks.json'}"
    )
    ci = issuer.token("ec-1", "ci-bot", jobmesh_tenant="team-c", jobmesh_roles=["client"])
    assert auth.authenticate(Call(ci)).tenant == "team-c"  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="no principal for subject"):
        auth.authenticate(Call(issuer.token("rsa-1")))  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="needs a credential"):
        auth.authenticate(Call(""))  # type: ignore[arg-type]


def test_an_auth_file_maps_each_jwt_subject_once(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(AUTH_FILE)
    assert set(AuthFile(path).principals.by_subject) == {WORKER_SUBJECT, CLIENT_SUBJECT}
    path.write_text(AUTH_FILE.replace(CLIENT_SUBJECT, WORKER_SUBJECT))
    with pytest.raises(OSError, match=r"\('team-a-api'\): jwt_subject is also 'image-workers'"):
        AuthFile(path)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOBMESH_JWKS_FILE": "jwks.json"}, "jwks_file needs jwt_issuer and jwt_audience"),
        (
            {"JOBMESH_JWKS_FILE": "jwks.json", "JOBMESH_JWT_ISSUER": ISSUER},
            "jwks_file needs jwt_issuer and jwt_audience",
        ),
        ({"JOBMESH_JWT_AUDIENCE": AUDIENCE}, "jwt_issuer and jwt_audience are for jwks_file"),
    ],
)
def test_jwt_settings_go_together(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewaySettings.from_env(env)


# --- a real gateway ---------------------------------------------------------------------


def jwt_gateway(
    cluster: Cluster, issuer: Issuer, *kids: str, auth: str | None = AUTH_FILE
) -> Gateway:
    """A gateway with the JWKS of `kids` (default: all) at `cluster.tmp / "jwks.json"` and,
    unless `auth` is None, that auth file."""
    flags = ["--jwks-file", str(issuer.write(cluster.tmp / "jwks.json", *kids))]
    flags += ["--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE]
    if auth is not None:
        (cluster.tmp / "auth.toml").write_text(auth)
        flags += ["--auth-file", str(cluster.tmp / "auth.toml")]
    return cluster.gateway(*flags)


async def test_a_service_account_token_attaches_a_worker_and_clients_submit_with_jwts(
    cluster: Cluster, issuer: Issuer
) -> None:
    gw = jwt_gateway(cluster, issuer)
    assert first_log_line(gw).endswith(
        f"auth: 3 principals from {cluster.tmp / 'auth.toml'}; JWTs of issuer {ISSUER!r} for "
        f"audience {AUDIENCE!r}, 2 keys from {cluster.tmp / 'jwks.json'}"
    )
    cluster.worker(gw, "images-1", wait=False, env={"JOBMESH_TOKEN": issuer.token("rsa-1")})
    await until(lambda: "images-1" in workers(gw))

    async with AsyncClient(gw.address, token=issuer.token("ec-1", CLIENT_SUBJECT)) as client:
        submitted = (await client.submit("echo", params={"n": 1})).job
        job = await client.wait(submitted.id, check=True)
        assert job.result is not None
        assert (job.tenant, job.submitted_by, job.worker_id) == ("team-a", "team-a-api", "images-1")
        assert job.result.metadata == {"n": 1}

    ci = issuer.token("rsa-1", "ci-bot", jobmesh_tenant="team-c", jobmesh_roles=["client"])
    async with AsyncClient(gw.address, token=ci) as client:
        job = await client.wait((await client.submit("echo")).job.id, check=True)
        assert (job.tenant, job.submitted_by, job.state) == ("team-c", "ci-bot", JobState.SUCCEEDED)


async def test_bad_tokens_are_unauthenticated_without_showing_them(
    cluster: Cluster, issuer: Issuer
) -> None:
    gw = jwt_gateway(cluster, issuer)
    stranger = Issuer()
    stranger.rsa("rsa-1")
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": CLIENT_SUBJECT, "aud": AUDIENCE, "exp": now + 600}
    tokens = {
        "expired": issuer.token("rsa-1", CLIENT_SUBJECT, lifetime=-120),
        "wrong audience": issuer.token("rsa-1", CLIENT_SUBJECT, audience="vault"),
        "wrong issuer": issuer.token("rsa-1", CLIENT_SUBJECT, issuer="https://evil.example"),
        "another key": stranger.token("rsa-1", CLIENT_SUBJECT),
        "alg none": forged({"alg": "none", "kid": "rsa-1"}, payload, None),
        "HS256 keyed with the public key": forged(
            {"alg": "HS256", "kid": "rsa-1"}, payload, issuer.public_pem("rsa-1")
        ),
        "garbage": "eyJub3Q.anNvbg.c2ln",
        "no principal": issuer.token("rsa-1", "system:serviceaccount:jobs:other"),
    }
    submit = job_service_pb2.SubmitRequest(spec=job_pb2.JobSpec(kind="echo"))
    async with grpc.aio.insecure_channel(gw.address) as channel:
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        for what, token in tokens.items():
            error = await refused(jobs.Submit(submit, metadata=bearer(token)))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, what
            details = error.details() or ""
            assert details.startswith(("the JWT", "the bearer token", "no principal")), details
            assert token not in details
    async with AsyncClient(gw.address, token=tokens["expired"]) as client:
        with pytest.raises(Unauthenticated, match="the JWT has expired"):
            await client.list()
    # A worker with a token of another key is refused at Attach and keeps trying.
    worker = cluster.worker(
        gw, "images-2", wait=False, env={"JOBMESH_TOKEN": stranger.token("rsa-1")}
    )
    await until(lambda: "signature does not verify" in worker.output())
    assert "images-2" not in workers(gw)


async def test_the_jwks_file_is_read_again_while_the_gateway_serves(
    cluster: Cluster, issuer: Issuer
) -> None:
    gw = jwt_gateway(cluster, issuer, "rsa-1", auth=None)
    old = issuer.token("rsa-1", "ci-bot", jobmesh_tenant="team-c", jobmesh_roles=["client"])
    issuer.rsa("rsa-2")
    new = issuer.token("rsa-2", "ci-bot", jobmesh_tenant="team-c", jobmesh_roles=["client"])
    async with AsyncClient(gw.address, token=old) as before:
        assert await before.list() == ([], "")  # verified, and remembered
        with pytest.raises(Unauthenticated, match="'rsa-2' is not in the JWKS file"):
            async with AsyncClient(gw.address, token=new) as after:
                await after.list()

        issuer.write(cluster.tmp / "jwks.json", "rsa-2")  # the issuer rotated its key
        async with AsyncClient(gw.address, token=new) as after:
            await until_accepted(after)
            with pytest.raises(Unauthenticated, match="'rsa-1' is not in the JWKS file"):
                await before.list()

            # A broken edit: one warning, the keys read before stay in force.
            (cluster.tmp / "jwks.json").write_text('{"keys": [')
            async with asyncio.timeout(10):
                while "the JWT keys read before stay in force" not in gw.output():
                    assert await after.list() == ([], "")
                    await asyncio.sleep(0.2)
            assert await after.list() == ([], "")
    assert gw.output().count("the JWT keys read before stay in force") == 1


def test_a_bad_jwks_file_stops_the_gateway_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}')
    done = subprocess.run(
        [
            *(sys.executable, "-m", "gateway", "--listen", "127.0.0.1:0", "--db", ":memory:"),
            *("--jwks-file", str(path), "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (
        3,
        f"jobmesh: JWKS file {path}: key #1 ('hmac'): a symmetric key; only public keys are "
        "accepted\n",
    )
