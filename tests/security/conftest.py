"""The platform the security suites probe: registry, features, training, inference and monitoring as real processes
with authentication on (HS256 with a secret of the suite's own), each with its own STRATA_HOME,
one serving process per service (so a crash is a dead process, not a restarted worker).

The homes lie several directories below a sandbox directory, so a path that climbs out of a
service's store by a few `..` still lands in the sandbox, where the fuzz suite looks for it
(nothing of the host is ever the target of a generated path)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import mint_token
from tests.processes import free_port, start_service, stop_process

SECRET = "security-suite-secret-0123456789abcdef0123"
ROLES = ("viewer", "developer", "approver", "admin")
SERVICES = ("registry", "features", "training", "inference", "monitoring")
#: How far below the sandbox the homes lie (`..` segments a generated path may climb and
#: still land in the sandbox).
SANDBOX_DEPTH = 8


@dataclass
class Platform:
    sandbox: Path
    homes: dict[str, Path]
    addrs: dict[str, str]
    procs: dict[str, subprocess.Popen]
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.insecure_channel(self.addrs[service])
        return self._channels[service]

    @staticmethod
    def subject(role: str) -> str:
        return f"sec-{role}"

    def token(self, role: str) -> str:
        return mint_token(SECRET, self.subject(role), [role])

    def auth(self, role: str) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token(role)}")]

    def database(self, service: str) -> Path:
        """The service's SQLite database: ServiceSettings.for_service's default,
        `$STRATA_HOME/<service>.db` (services/common/settings.py), which holds audit_events."""
        return self.homes[service] / f"{service}.db"

    def log(self, service: str) -> Path:
        """Where tests/processes.start_service sends the process's stdout and stderr."""
        return self.homes[service] / f"{service}.log"

    def alive(self, service: str) -> bool:
        return self.procs[service].poll() is None

    def health(self, service: str) -> str:
        """grpc.health.v1 status of the whole server, or the error that stood in its way."""
        try:
            resp = health_pb2_grpc.HealthStub(self.channel(service)).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"

    def log_records(self, service: str, request_id: str) -> list[dict]:
        """The JSON log lines of one call (by its x-request-id)."""
        out = []
        try:
            text = self.log(service).read_text(errors="replace")
        except OSError:
            return out
        for line in text.splitlines():
            if request_id not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("request_id") == request_id:
                out.append(rec)
        return out

    def log_tail(self, service: str, chars: int = 4000) -> str:
        try:
            return self.log(service).read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"(no log: {e})"


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    sandbox = tmp_path_factory.mktemp("security")
    base = sandbox.joinpath(*[f"d{i}" for i in range(SANDBOX_DEPTH)])
    homes = {name: base / name for name in SERVICES}
    addrs: dict[str, str] = {}
    procs: dict[str, subprocess.Popen] = {}
    common = {"STRATA_JWT_SECRET": SECRET, "STRATA_AUTH": "enabled", "STRATA_LOG_FORMAT": "json"}
    try:
        for name in SERVICES:
            port = free_port()
            # (monitoring is one process per STRATA_HOME: it has no WORKERS setting)
            env = {**common} if name == "monitoring" else {**common, f"STRATA_{name.upper()}_WORKERS": "1"}
            if name == "inference":
                env |= {"STRATA_REGISTRY_ADDR": addrs["registry"], "STRATA_INFERENCE_POLL_SECONDS": "0.2"}
            if name == "monitoring":
                env |= {"STRATA_REGISTRY_ADDR": addrs["registry"]}
            if name == "training":  # jobs are submitted, not run: no worker processes
                env |= {"STRATA_REGISTRY_ADDR": addrs["registry"], "STRATA_FEATURES_ADDR": addrs["features"],
                        "STRATA_TRAINING_WORKERS": "0"}
            procs[name] = start_service(name, homes[name], port, env)
            addrs[name] = f"127.0.0.1:{port}"
        p = Platform(sandbox, homes, addrs, procs)
        yield p
        for ch in p._channels.values():
            ch.close()
    finally:
        for proc in reversed(list(procs.values())):
            stop_process(proc)
