"""Waiting for a process to be ready (launcher, gateway, tests, scripts): a gRPC service to report
SERVING, over a channel from services/common/client.py so the probe speaks TLS/mTLS when the
platform does; an HTTP endpoint (Envoy's admin /ready, the MLflow server's /health) to answer 200."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.client import open_channel


def wait_serving(addr: str, timeout: float = 30, alive: Callable[[], bool] | None = None,
                 what: str = "service") -> None:
    """Poll grpc.health.v1 Check on addr until SERVING. `alive` says whether the process is
    still running, so a crash at start-up fails at once instead of after the timeout."""
    deadline = time.monotonic() + timeout
    raw, _ = open_channel(addr)
    with raw:
        stub = health_pb2_grpc.HealthStub(raw)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"{what} exited during start-up")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"{what} not SERVING on {addr} after {timeout:.0f} s")


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None, what: str = "service") -> None:
    """Poll `url` until it answers 200; with `process`, fail at once if it has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while still initialising
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready on {url} after {timeout}s")
