"""Token verification: HS256 locally, RS256 from a JWKS in production; and TLS/mTLS on the
shared server bootstrap."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import Authenticator, mint_token
from services.common.errors import Unauthenticated
from services.common.server import serve
from services.common.settings import CommonSettings, ServiceSettings
from services.registry.app import build_service
from tests.processes import free_port

SECRET = "auth-test-secret-0123456789abcdef012345"


def test_hs256_token_gives_subject_and_roles() -> None:
    auth = Authenticator(CommonSettings(jwt_secret=SECRET))
    p = auth.authenticate(f"Bearer {mint_token(SECRET, 'ann', ['developer', 'viewer'])}")
    assert p.subject == "ann" and p.roles == {"developer", "viewer"}


@pytest.mark.parametrize(("header", "problem"), [
    (None, "missing bearer token"),
    ("Basic abc", "Bearer <jwt>"),
    (f"Bearer {mint_token('x' * 40, 'ann', ['admin'])}", "invalid token"),
    (f"Bearer {mint_token(SECRET, 'ann', ['admin'], audience='someone-else')}", "invalid token"),
    (f"Bearer {mint_token(SECRET, 'ann', ['admin'], ttl_seconds=-5)}", "expired"),
])
def test_bad_tokens_are_unauthenticated(header: str | None, problem: str) -> None:
    with pytest.raises(Unauthenticated, match=problem):
        Authenticator(CommonSettings(jwt_secret=SECRET)).authenticate(header)


def test_auth_enabled_without_keys_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="STRATA_AUTH=disabled"):
        CommonSettings(auth="enabled")


def test_rs256_token_verified_against_a_jwks_file(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    now = int(time.time())
    token = jwt.encode({"iss": "strata", "aud": "strata-api", "sub": "svc-trainer", "roles": ["developer"],
                        "exp": now + 60}, key, algorithm="RS256", headers={"kid": "k1"})
    auth = Authenticator(CommonSettings(jwt_jwks_file=jwks))
    assert auth.authenticate(f"Bearer {token}").subject == "svc-trainer"
    with pytest.raises(Unauthenticated):  # HS256 is not accepted when only a JWKS is configured
        auth.authenticate(f"Bearer {mint_token(SECRET, 'ann', ['admin'])}")


def _cert(subject: str, issuer_key, issuer_name, public_key, ca: bool):  # noqa: ANN001, ANN202
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(public_key)
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
         .not_valid_after(now + dt.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:  # noqa: ANN001
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


async def test_mtls_server_accepts_only_clients_with_a_certificate(tmp_path: Path) -> None:
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca = _cert("strata-ca", ca_key, None, ca_key.public_key(), ca=True)
    keys = {n: rsa.generate_private_key(public_exponent=65537, key_size=2048) for n in ("server", "client")}
    certs = {n: _cert(n if n == "client" else "localhost", ca_key, ca.subject, k.public_key(), ca=False)
             for n, k in keys.items()}
    for n in keys:
        (tmp_path / f"{n}.key").write_bytes(_pem(keys[n]))
        (tmp_path / f"{n}.crt").write_bytes(_pem(certs[n]))
    (tmp_path / "ca.crt").write_bytes(_pem(ca))
    port = free_port()
    settings = ServiceSettings.for_service(
        "registry", home=tmp_path / "home", host="127.0.0.1", port=port, metrics_port=0, auth="disabled",
        tls_cert_file=tmp_path / "server.crt", tls_key_file=tmp_path / "server.key",
        tls_client_ca_file=tmp_path / "ca.crt")
    started, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(build_service(settings), started, stop))
    await asyncio.wait_for(started.wait(), 20)
    opts = (("grpc.ssl_target_name_override", "localhost"),)
    try:
        with_cert = grpc.ssl_channel_credentials(_pem(ca), _pem(keys["client"]), _pem(certs["client"]))
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", with_cert, opts) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        without_cert = grpc.ssl_channel_credentials(_pem(ca))
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", without_cert, opts) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
