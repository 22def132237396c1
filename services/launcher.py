"""`strata up`: the whole platform on one machine on embedded defaults (SQLite, local artifact
directory under STRATA_HOME), Envoy in front, every process supervised: a child that dies is
logged and restarted with backoff; Ctrl-C or SIGTERM stops them all cleanly."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from services.common.auth import mint_token
from services.common.health import wait_serving
from services.common.settings import DEFAULT_PORTS
from services.common.supervisor import Child, Supervisor

log = logging.getLogger("strata.launcher")

# The services `strata up` runs, in start order. Add the others here as they land.
PLATFORM_SERVICES = ["registry", "features", "inference"]
DEV_ROLES = ["viewer", "developer", "approver", "admin"]


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
    # A laptop-sized platform: at most two serving processes per service unless asked for more
    # (the services' own default is one per core, right for a dedicated machine).
    for name in ("features", "inference"):
        key = f"STRATA_{name.upper()}_WORKERS"
        env[key] = os.environ.get(key, str(min(2, os.cpu_count() or 1)))
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
        env[f"STRATA_{name.upper()}_ADDR"] = upstreams[name]  # how the services find each other
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

            code = run_demo(home, gateway=f"http://127.0.0.1:{gateway_port}", registry=upstreams["registry"],
                            inference=upstreams["inference"])
        ok = sup.watch()
        return code if ok else 1
    finally:  # whatever happens here, no child outlives the launcher
        log.info("stopping")
        sup.stop_all()
