"""`strata up`: the whole platform on one machine on embedded defaults (SQLite, local artifact
directory under STRATA_HOME), Envoy in front, every process supervised: a child that dies is
logged and restarted with backoff; Ctrl-C or SIGTERM stops them all cleanly."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.common.auth import mint_token
from services.common.health import wait_serving
from services.common.settings import DEFAULT_PORTS

log = logging.getLogger("strata.launcher")

# The services `strata up` runs, in start order. Add the others here as they land.
PLATFORM_SERVICES = ["registry"]
DEV_ROLES = ["viewer", "developer", "approver", "admin"]


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)  # times of recent restarts
    next_start: float = 0.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # Ctrl-C reaches us, not the children


class Supervisor:
    """Keeps children running. A child that exits is restarted after a backoff that doubles
    (1 s .. 30 s); more than `max_restarts` restarts within `window` seconds means it cannot
    run, and the supervisor gives up (stops everything, returns False from `watch`)."""

    def __init__(self, children: list[Child], *, max_restarts: int = 5, window: float = 60.0,
                 poll_interval: float = 0.2) -> None:
        self.children = children
        self.max_restarts = max_restarts
        self.window = window
        self.poll_interval = poll_interval
        self.stopping = threading.Event()

    def start_all(self, ready: Callable[[Child], None] | None = None) -> None:
        for child in self.children:
            child.start()
            if ready is not None:
                ready(child)

    def check_once(self, now: float | None = None) -> bool:
        """Restart what died; False when a child crashes too often to keep trying."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                continue
            if child.next_start == 0.0:  # just noticed the exit
                child.restarts = [t for t in child.restarts if now - t < self.window] + [now]
                if len(child.restarts) > self.max_restarts:
                    log.error("%s exited %d times within %.0f s; giving up (log: %s)", child.name,
                              len(child.restarts), self.window, child.log_path)
                    return False
                delay = min(30.0, 2.0 ** (len(child.restarts) - 1))
                child.next_start = now + delay
                log.warning("%s exited with status %s; restarting in %.0f s (log: %s)", child.name,
                            child.proc.returncode, delay, child.log_path)
            elif now >= child.next_start:
                child.next_start = 0.0
                child.start()
                log.info("%s restarted (pid %d)", child.name, child.proc.pid)  # type: ignore[union-attr]
        return True

    def watch(self) -> bool:
        """Supervise until stop() is called (True) or a child gives up (False)."""
        while not self.stopping.is_set():
            if not self.check_once():
                return False
            self.stopping.wait(self.poll_interval)
        return True

    def stop(self) -> None:
        self.stopping.set()

    def stop_all(self, timeout: float = 20.0) -> None:
        """SIGTERM in reverse start order (gateway before services), then SIGKILL stragglers."""
        live = [c.proc for c in reversed(self.children) if c.proc is not None and c.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def dev_secret(home: Path) -> str:
    """STRATA_JWT_SECRET, else a random secret kept (0600) in STRATA_HOME for local use."""
    if os.environ.get("STRATA_JWT_SECRET"):
        return os.environ["STRATA_JWT_SECRET"]
    path = home / "dev-secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def write_tokens(home: Path, secret: str) -> Path:
    """Development tokens (30 days), one per role, for `source .strata/tokens.env`."""
    lines = [f"export STRATA_{role.upper()}_TOKEN={mint_token(secret, f'dev-{role}', [role], ttl_seconds=30 * 86400)}"
             for role in DEV_ROLES]
    lines.append("export STRATA_TOKEN=$STRATA_ADMIN_TOKEN")
    path = home / "tokens.env"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def run_platform(*, home: Path, demo: bool = False, auth: bool = True, gateway_port: int = 8080,
                 admin_port: int = 9901) -> int:
    from gateway.config import render_envoy_config
    from gateway.envoy import envoy_binary, validate_config, wait_ready, write_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s strata: %(message)s", datefmt="%H:%M:%S")
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    logs = home / "logs"
    env = {"STRATA_HOME": str(home)}
    secret = None
    if auth:
        secret = dev_secret(home)
        env["STRATA_JWT_SECRET"] = secret
        tokens = write_tokens(home, secret)
    else:
        env["STRATA_AUTH"] = "disabled"

    children: list[Child] = []
    upstreams = {}
    for name in PLATFORM_SERVICES:
        port = int(os.environ.get(f"STRATA_{name.upper()}_PORT", DEFAULT_PORTS[name]))
        upstreams[name] = f"127.0.0.1:{port}"
        children.append(Child(name, [sys.executable, "-m", f"services.{name}"], logs / f"{name}.log", env))
    config = render_envoy_config(upstreams=upstreams, descriptor_path=Path(__file__).parents[1] / "gateway" / "strata.pb",
                                 jwt_secret=secret, auth_enabled=auth, listen_port=gateway_port, admin_port=admin_port)
    config_path = write_config(config, home / "gateway")
    validate_config(config_path)
    children.append(Child("gateway", [envoy_binary(), "-c", str(config_path), "--use-dynamic-base-id",
                                      "--concurrency", "2"], logs / "envoy.log"))

    sup = Supervisor(children)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sup.stop())

    def ready(child: Child) -> None:
        if child.name == "gateway":
            wait_ready(admin_port, 30, process=child.proc)
        else:
            proc = child.proc
            try:
                wait_serving(upstreams[child.name], 60, alive=lambda: proc.poll() is None, what=child.name)
            except (RuntimeError, TimeoutError) as e:
                raise type(e)(f"{e}; see {child.log_path}") from None
        log.info("%s up (pid %d)", child.name, child.proc.pid)  # type: ignore[union-attr]

    try:
        try:
            sup.start_all(ready)
        except (RuntimeError, TimeoutError) as e:
            log.error("%s", e)
            return 1
        print(f"\nStrata is running (home {home}):")
        for name, addr in upstreams.items():
            port = int(addr.rsplit(":", 1)[1])
            print(f"  {name:<10} gRPC {addr}   metrics http://127.0.0.1:{port + 1000}/metrics")
        print(f"  gateway    REST + gRPC http://127.0.0.1:{gateway_port}   admin http://127.0.0.1:{admin_port}")
        print(f"  tokens     source {tokens}" if auth else "  auth       DISABLED (--no-auth)")
        print("  logs       " + str(logs) + "\nCtrl-C stops everything.\n")
        code = 0
        if demo:
            from services.demo import run_demo

            code = run_demo(home, gateway=f"http://127.0.0.1:{gateway_port}", registry=upstreams["registry"])
        ok = sup.watch()
        return code if ok else 1
    finally:  # whatever happens here, no child outlives the launcher
        log.info("stopping")
        sup.stop_all()
