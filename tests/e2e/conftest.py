"""The platform as users run it: a registry process and a real Envoy in front, with JWT auth."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.config import render_envoy_config
from gateway.envoy import start_envoy, wait_ready, write_config
from services.common.auth import mint_token
from tests.processes import free_port, start_service, stop_process

ROOT = Path(__file__).resolve().parents[2]
SECRET = "e2e-secret-0123456789abcdef0123456789"


@dataclass
class Platform:
    home: Path
    grpc_addr: str
    rest: str  # http://127.0.0.1:<gateway port>

    def token(self, sub: str, *roles: str) -> str:
        return mint_token(SECRET, sub, list(roles))

    def headers(self, sub: str, *roles: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub, *roles)}"}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    home = tmp_path_factory.mktemp("e2e-home")
    port = free_port()
    registry = start_service("registry", home, port, {"STRATA_JWT_SECRET": SECRET})
    gw_port, admin_port = free_port(), free_port()
    config = render_envoy_config(upstreams={"registry": f"127.0.0.1:{port}"},
                                 descriptor_path=ROOT / "gateway" / "strata.pb", jwt_secret=SECRET,
                                 listen_host="127.0.0.1", listen_port=gw_port, admin_port=admin_port)
    envoy = start_envoy(write_config(config, home / "gateway"), home / "envoy.log")
    try:
        wait_ready(admin_port, 20, process=envoy)
        yield Platform(home, f"127.0.0.1:{port}", f"http://127.0.0.1:{gw_port}")
    finally:
        stop_process(envoy)
        stop_process(registry)
