"""`strata up`: the one-command platform runs the demo, restarts a crashed service, and stops
everything on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import ROOT, free_port, wait_serving
from tests.e2e.launch import alive

pytestmark = pytest.mark.e2e


def _wait_for(pattern: str, log: Path, timeout: float = 60) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text())
        if m:
            return m
        time.sleep(0.2)
    raise TimeoutError(f"{pattern!r} not in {log}:\n{log.read_text()[-3000:]}")


def test_strata_up_demo_restart_and_clean_stop(tmp_path: Path) -> None:
    home, log = tmp_path / "home", tmp_path / "up.log"
    port = free_port()
    env = {**os.environ, "STRATA_REGISTRY_PORT": str(port), "STRATA_REGISTRY_METRICS_PORT": str(free_port()),
           "STRATA_INFERENCE_PORT": str(free_port()), "STRATA_INFERENCE_METRICS_PORT": str(free_port()),
           "STRATA_FEATURES_PORT": str(free_port()), "STRATA_FEATURES_METRICS_PORT": str(free_port()),
           "STRATA_TRAINING_PORT": str(free_port()), "STRATA_TRAINING_METRICS_PORT": str(free_port()),
           "STRATA_MONITORING_PORT": str(free_port()), "STRATA_MONITORING_METRICS_PORT": str(free_port()),
           "STRATA_MLFLOW_PORT": str(free_port())}
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--demo", "--home", str(home),
                               "--gateway-port", str(free_port()), "--admin-port", str(free_port())],
                              cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(r"demo OK", log, 180)
        registry_pid = int(_wait_for(r"registry up \(pid (\d+)\)", log).group(1))
        envoy_pid = int(_wait_for(r"gateway up \(pid (\d+)\)", log).group(1))
        os.kill(registry_pid, signal.SIGKILL)
        new_pid = int(_wait_for(r"registry restarted \(pid (\d+)\)", log, 30).group(1))
        assert "registry exited with status -9" in log.read_text()
        wait_serving(f"127.0.0.1:{port}", None, home / "logs" / "registry.log")
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        time.sleep(0.2)
        assert not alive(new_pid) and not alive(envoy_pid)
    finally:
        if up.poll() is None:
            up.kill()
            # The children run in sessions of their own (Ctrl-C reaches only the launcher): a test
            # that failed must not leave them holding ports.
            for pid in re.findall(r"up \(pid (\d+)\)|restarted \(pid (\d+)\)", log.read_text()):
                for p in filter(None, pid):
                    if alive(int(p)):
                        os.kill(int(p), signal.SIGTERM)
