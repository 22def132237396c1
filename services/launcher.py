"""`strata up`: the whole platform on one machine on embedded defaults (SQLite, local artifact
directory under STRATA_HOME), Envoy in front, every process supervised: a child that dies is
logged and restarted with backoff; Ctrl-C or SIGTERM stops them all cleanly.

Every port is checked before anything starts: a port in use (another platform, anything else)
stops `strata up` with a message naming it, so another platform's health checks are never taken
for this one's. It listens on loopback unless told otherwise (--host, STRATA_HOST,
STRATA_<NAME>_HOST), and follows the STRATA_TLS_* settings on every listener and every client
(health probes, service to service, Envoy's upstream clusters, the demo)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.client import ClientTLS
from services.common.health import wait_http, wait_serving
from services.common.settings import (TLSSettings, admin_port as default_admin_port, connect_host, listen_host,
                                      listen_port, metrics_port)
from services.common.supervisor import Child, Supervisor
from services.dev_credentials import dev_secret, write_tokens

log = logging.getLogger("strata.launcher")

# The services `strata up` runs, in start order (monitoring before inference, whose prediction log
# it receives). Add the others here as they land.
PLATFORM_SERVICES = ["registry", "features", "training", "monitoring", "inference"]
#: The MLflow tracking UI over the training service's backend (STRATA_MLFLOW_PORT), as MLflow users expect.
MLFLOW_PORT = 5000


def mlflow_ui(home: Path, host: str, port: int, log_path: Path) -> Child:
    """`mlflow server` on the training service's tracking store, so the UI, its REST API and
    `mlflow.search_runs` show every job and trial."""
    backend = os.environ.get("STRATA_TRAINING_MLFLOW_TRACKING_URI") or f"sqlite:///{(home / 'mlflow.db').resolve()}"
    return Child("mlflow", [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                            "--host", host, "--port", str(port), "--workers", "1"], log_path)


@dataclass(frozen=True)
class Listener:
    """A port the platform will listen on, and the setting that chooses it."""

    what: str
    host: str
    port: int
    setting: str


def _can_bind(host: str, port: int) -> bool:
    # SO_REUSEADDR only ignores connections of an earlier run in TIME_WAIT: a socket that is
    # listening on the port (on this address or the wildcard) still makes bind fail.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def ports_in_use(listeners: list[Listener]) -> list[str]:
    """What stops the platform from listening where it is told to, one line per port."""
    problems, seen = [], {}
    for listener in listeners:
        if listener.port in seen:
            problems.append(f"port {listener.port} is set twice: {seen[listener.port].what} "
                            f"({seen[listener.port].setting}) and {listener.what} ({listener.setting})")
            continue
        seen[listener.port] = listener
        if not _can_bind(listener.host, listener.port):
            problems.append(f"port {listener.port} ({listener.what}, {listener.setting}) is already in use on "
                            f"{listener.host}")
    return problems


def _check_tls(tls: TLSSettings) -> None:
    """The files exist, and the platform's own clients can talk to its listeners."""
    for field in type(tls).model_fields:
        path = getattr(tls, field)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"STRATA_{field.upper()}={path}: no such file")
    if tls.tls_ca_file and not tls.tls_cert_file:
        raise ValueError("STRATA_TLS_CA_FILE is set but STRATA_TLS_CERT_FILE/STRATA_TLS_KEY_FILE are not: "
                         "the services would listen in plaintext and their clients would speak TLS")
    if tls.tls_client_ca_file and not tls.tls_client_cert_file:
        raise ValueError("STRATA_TLS_CLIENT_CA_FILE (mTLS) needs STRATA_TLS_CLIENT_CERT_FILE/STRATA_TLS_CLIENT_KEY_FILE: "
                         "the certificate the platform's own clients (health checks, Envoy, services) present")


def run_platform(*, home: Path, demo: bool = False, auth: bool = True, host: str | None = None,
                 gateway_port: int | None = None, admin_port: int | None = None) -> int:
    """Run the platform in the foreground. `host`: where everything listens (default STRATA_HOST
    or loopback); ports from STRATA_<NAME>_PORT / STRATA_<NAME>_METRICS_PORT, the gateway's from
    `gateway_port` / STRATA_GATEWAY_PORT and `admin_port` / STRATA_GATEWAY_ADMIN_PORT."""
    from gateway.config import render_envoy_config
    from gateway.envoy import envoy_binary, validate_config, wait_ready, write_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s strata: %(message)s", datefmt="%H:%M:%S")
    tls_settings = TLSSettings()
    _check_tls(tls_settings)
    tls = ClientTLS.from_settings(tls_settings)
    settings_env: Mapping[str, str] = {**os.environ, **({"STRATA_HOST": host} if host else {})}
    gateway_host = listen_host("gateway", settings_env)
    gateway_port = gateway_port or listen_port("gateway")
    admin_port = admin_port or default_admin_port()
    listeners, upstreams = [], {}
    for name in PLATFORM_SERVICES:
        service_host, port, metrics = listen_host(name, settings_env), listen_port(name), metrics_port(name)
        upstreams[name] = f"{connect_host(service_host)}:{port}"
        listeners += [Listener(f"{name} gRPC", service_host, port, f"STRATA_{name.upper()}_PORT"),
                      Listener(f"{name} metrics", service_host, metrics, f"STRATA_{name.upper()}_METRICS_PORT")]
    mlflow_port = int(os.environ.get("STRATA_MLFLOW_PORT", MLFLOW_PORT))
    listeners.append(Listener("MLflow UI", gateway_host, mlflow_port, "STRATA_MLFLOW_PORT"))
    listeners += [Listener("gateway", gateway_host, gateway_port, "--gateway-port / STRATA_GATEWAY_PORT"),
                  Listener("Envoy admin", "127.0.0.1", admin_port, "--admin-port / STRATA_GATEWAY_ADMIN_PORT")]
    taken = ports_in_use(listeners)
    if taken:
        for problem in taken:
            log.error("cannot start: %s", problem)
        log.error("another Strata platform (or another program) may be running: stop it, or choose other "
                  "ports with the settings named above. Nothing was started.")
        return 1

    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    logs = home / "logs"
    env = {"STRATA_HOME": str(home), **({"STRATA_HOST": host} if host else {})}
    # A laptop-sized platform: at most two serving processes per service unless asked for more
    # (the services' own default is one per core, right for a dedicated machine).
    for name in ("features", "inference"):
        key = f"STRATA_{name.upper()}_WORKERS"
        env[key] = os.environ.get(key, str(min(2, os.cpu_count() or 1)))
    env["STRATA_TRAINING_WORKERS"] = os.environ.get("STRATA_TRAINING_WORKERS", "1")
    # Inference sends its prediction log to the platform's monitoring service (STRATA_MONITORING_ADDR).
    env["STRATA_INFERENCE_MONITORING"] = os.environ.get("STRATA_INFERENCE_MONITORING", "auto")
    secret = None
    if auth:
        secret = dev_secret(home)
        env["STRATA_JWT_SECRET"] = secret
    else:
        env["STRATA_AUTH"] = "disabled"
    tokens = write_tokens(home, secret, tls)

    children: list[Child] = []
    for name in PLATFORM_SERVICES:
        env[f"STRATA_{name.upper()}_ADDR"] = upstreams[name]  # how the services find each other
        children.append(Child(name, [sys.executable, "-m", f"services.{name}"], logs / f"{name}.log", env))
    children.append(mlflow_ui(home, gateway_host, mlflow_port, logs / "mlflow.log"))
    config = render_envoy_config(upstreams=upstreams, descriptor_path=Path(__file__).parents[1] / "gateway" / "strata.pb",
                                 jwt_secret=secret, auth_enabled=auth, listen_host=gateway_host,
                                 listen_port=gateway_port, admin_port=admin_port, upstream_tls=tls)
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
        elif child.name == "mlflow":
            try:
                wait_http(f"http://{connect_host(gateway_host)}:{mlflow_port}/health", 90, child.proc, what="mlflow")
            except (RuntimeError, TimeoutError) as e:
                raise type(e)(f"{e}; see {child.log_path}") from None
        else:
            proc = child.proc
            try:
                wait_serving(upstreams[child.name], 60, alive=lambda: proc.poll() is None, what=child.name)
                if proc.poll() is not None:  # whoever answered, it was not this child
                    raise RuntimeError(f"{child.name} exited during start-up")
            except (RuntimeError, TimeoutError) as e:
                raise type(e)(f"{e}; see {child.log_path}") from None
        log.info("%s up (pid %d)", child.name, child.proc.pid)  # type: ignore[union-attr]

    gateway_url = f"http://{connect_host(gateway_host)}:{gateway_port}"
    try:
        try:
            sup.start_all(ready)
        except (RuntimeError, TimeoutError) as e:
            log.error("%s", e)
            return 1
        print(f"\nStrata is running (home {home}):")
        for name, addr in upstreams.items():
            print(f"  {name:<10} gRPC {addr}   metrics http://{addr.rsplit(':', 1)[0]}:{metrics_port(name)}/metrics")
        print(f"  gateway    REST + gRPC {gateway_url}   admin http://127.0.0.1:{admin_port}")
        print(f"  mlflow     UI and REST http://{connect_host(gateway_host)}:{mlflow_port}")
        if tls is not None:
            mode = "mTLS" if tls_settings.tls_client_ca_file else "TLS"
            print(f"  {mode:<10} every gRPC port; clients trust {tls.ca_file or 'the system CA bundle'}")
        print(f"  tokens     source {tokens}" if auth else f"  auth       DISABLED (--no-auth); source {tokens}")
        print("  logs       " + str(logs) + "\nCtrl-C stops everything.\n", flush=True)
        code = 0
        if demo:
            from services.demo import run_demo

            code = run_demo(home, gateway=gateway_url, registry=upstreams["registry"],
                            inference=upstreams["inference"])
        ok = sup.watch()
        return code if ok else 1
    finally:  # whatever happens here, no child outlives the launcher
        log.info("stopping")
        sup.stop_all()
