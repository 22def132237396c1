"""TLS for the whole platform: `strata up --demo` with TLS, then with mTLS, on every listener and
every client inside it (the launcher's health probes, inference -> registry, Envoy -> the
services, the demo, the CLI, and the grpcurl/curl commands the demo prints)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.certs import make_pki
from tests.e2e.launch import check_pasted, port_env, printed_commands, run_pasted, strata, strata_sourced, strata_up

pytestmark = pytest.mark.e2e


def _health(channel: grpc.Channel) -> int:
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.parametrize("mode", ["tls", "mtls"])
def test_platform_and_demo_with_tls_everywhere(tmp_path: Path, mode: str) -> None:
    pki = make_pki(tmp_path / "pki")
    env = {**port_env(), "STRATA_TLS_CERT_FILE": str(pki.server_cert), "STRATA_TLS_KEY_FILE": str(pki.server_key),
           "STRATA_TLS_CA_FILE": str(pki.ca)}
    if mode == "mtls":
        env |= {"STRATA_TLS_CLIENT_CA_FILE": str(pki.ca), "STRATA_TLS_CLIENT_CERT_FILE": str(pki.client_cert),
                "STRATA_TLS_CLIENT_KEY_FILE": str(pki.client_key)}
    home = tmp_path / "home"
    registry = f"127.0.0.1:{env['STRATA_REGISTRY_PORT']}"
    with strata_up(home, env, "--demo") as up:
        up.wait_for(r"demo OK", 240)
        out = up.output()
        assert "deploy it" in out and "predictions match" in out  # inference loaded the model from the registry

        # The listeners really are TLS (and mTLS): a plaintext client, and without mTLS's client
        # certificate a TLS client, get no answer.
        with pytest.raises(grpc.RpcError) as e:
            _health(grpc.insecure_channel(registry))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        ca = pki.ca.read_bytes()
        if mode == "mtls":
            with pytest.raises(grpc.RpcError) as e:
                _health(grpc.secure_channel(registry, grpc.ssl_channel_credentials(ca)))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            creds = grpc.ssl_channel_credentials(ca, pki.client_key.read_bytes(), pki.client_cert.read_bytes())
        else:
            creds = grpc.ssl_channel_credentials(ca)
        assert _health(grpc.secure_channel(registry, creds)) == health_pb2.HealthCheckResponse.SERVING

        # The CLI (registry, inference and feature commands) with the ports and what
        # `source .strata/tokens.env` gives it: the token and the client TLS settings.
        ports = {k: v for k, v in env.items() if not k.startswith("STRATA_TLS_")}
        for args, expect in ((["models", "list"], "demo-scorer-"), (["endpoints", "list"], "demo-"),
                             (["features", "list"], "demo_users_")):
            r = strata_sourced(home, ports, *args)
            assert r.returncode == 0 and expect in r.stdout, f"strata {' '.join(args)}: {r.stderr}"
        plaintext = strata({**ports, "STRATA_TOKEN": up.token("admin")}, "models", "list")
        assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr, plaintext.stderr

        # REST through Envoy, which speaks TLS (with its client certificate for mTLS) upstream.
        url = f"http://127.0.0.1:{env['STRATA_GATEWAY_PORT']}/v1/models"
        r = requests.get(url, headers={"Authorization": f"Bearer {up.token('viewer')}"}, timeout=10)
        assert r.status_code == 200 and "demo-scorer-" in r.text, r.text

        # The commands the demo printed work when pasted, TLS options included.
        work = tmp_path / "shell"
        work.mkdir()
        commands = printed_commands(out)
        assert any("grpcurl" in c and "-cacert" in c for c in commands), commands
        check_pasted(run_pasted(commands, home, work), out, work)
