"""The local platform is honest: `strata up` refuses ports that are taken (naming them) instead
of reporting another platform's health as its own, binds to loopback unless told otherwise, and
the CLI, `strata demo` and the commands the demo prints follow the same port settings."""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import requests
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.e2e.launch import check_pasted, port_env, printed_commands, run_pasted, strata, strata_sourced, strata_up

pytestmark = pytest.mark.e2e


@contextmanager
def another_platform(port: int) -> Iterator[None]:
    """A gRPC server on 127.0.0.1:port that answers health checks with SERVING, as another
    Strata (or any gRPC service) would."""
    server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield
    finally:
        server.stop(None)


@contextmanager
def listening(port: int) -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield


@pytest.mark.parametrize("variable", ["STRATA_REGISTRY_PORT", "STRATA_FEATURES_METRICS_PORT", "STRATA_GATEWAY_PORT"])
def test_up_refuses_a_port_in_use_and_names_it(tmp_path: Path, variable: str) -> None:
    env = port_env()
    port = int(env[variable])
    holder = another_platform(port) if variable == "STRATA_REGISTRY_PORT" else listening(port)
    with holder, strata_up(tmp_path / "home", env, "--demo") as up:
        try:
            code = up.proc.wait(45)
        except Exception:
            code = None
        out = up.output()
        assert code == 1, f"strata up did not stop (exit {code}):\n{out[-3000:]}"
        assert "Strata is running" not in out and "== register" not in out
        assert f"port {port}" in out and variable in out, out[-3000:]
        assert " up (pid" not in out, "a process was started before the ports were checked"


def _listening_addresses(ports: set[int]) -> dict[int, set[str]]:
    """Local addresses of the listening TCP sockets on `ports` (from /proc/net/tcp{,6})."""
    found: dict[int, set[str]] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state != "0A":  # LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            port = int(port_hex, 16)
            if port not in ports:
                continue
            raw = bytes.fromhex(addr_hex)
            if v6:
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, words)
            else:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            found.setdefault(port, set()).add(addr)
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # grpc binds 127.0.0.1 on a dual-stack socket
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_platform_on_its_own_ports_cli_demo_and_the_commands_it_prints(tmp_path: Path) -> None:
    env = port_env()
    home = tmp_path / "home"
    with strata_up(home, env) as up:
        up.wait_for(r"Strata is running")
        ports = {int(v) for v in env.values()}
        bound = _listening_addresses(ports)
        assert set(bound) == ports, f"not listening: {sorted(ports - set(bound))}"
        assert all(_loopback(a) for addrs in bound.values() for a in addrs), f"not loopback only: {bound}"

        # The CLI and the demo find the platform from the same STRATA_*_PORT settings.
        demo = strata(env, "demo", "--home", str(home), timeout=120)
        assert demo.returncode == 0 and "demo OK" in demo.stdout, demo.stdout[-3000:] + demo.stderr[-3000:]
        for args, expect in ((["models", "list"], "demo-scorer-"), (["endpoints", "list"], "demo-"),
                             (["features", "list"], "demo_users_")):
            r = strata_sourced(home, env, *args)
            assert r.returncode == 0 and expect in r.stdout, f"strata {' '.join(args)}: {r.stderr}"

        # The demo's predictions reached the monitoring service (the inference service's prediction
        # log, delivered), and the gateway serves its reports over REST.
        endpoint = re.search(r"^endpoint (demo-\S+) revision", demo.stdout, re.M)
        assert endpoint, demo.stdout[-3000:]
        url = f"http://127.0.0.1:{env['STRATA_GATEWAY_PORT']}/v1/monitoring/performance"
        deadline, versions = time.monotonic() + 30, []
        while not versions and time.monotonic() < deadline:
            r = requests.get(url, params={"endpoint": endpoint.group(1)},
                             headers={"Authorization": f"Bearer {up.token('viewer')}"}, timeout=30)
            versions = r.json().get("versions", []) if r.status_code == 200 else []
            time.sleep(0.5)
        assert [int(v["rows"]) for v in versions] == [2], f"{r.status_code} {r.text}"  # the 2 rows predicted over REST

        # What the demo printed works when pasted into a fresh shell.
        work = tmp_path / "shell"
        work.mkdir()
        check_pasted(run_pasted(printed_commands(demo.stdout), home, work), demo.stdout, work)
