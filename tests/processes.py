"""Start Strata services as real processes for integration, e2e and benchmark tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from services.common import health

ROOT = Path(__file__).resolve().parents[1]


_issued: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, and not handed out before by this process: the kernel may
    give a just-released port again, so two calls in a row (a gateway and its admin port) could
    otherwise get the same one before either is bound."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _issued:
            break
    _issued.add(port)
    return port


def wait_serving(addr: str, proc: subprocess.Popen | None, log: Path, timeout: float = 30) -> None:
    try:
        health.wait_serving(addr, timeout, alive=None if proc is None else lambda: proc.poll() is None)
    except (RuntimeError, TimeoutError) as e:
        raise type(e)(f"{e}:\n{log.read_text()[-4000:]}") from None


def start_service(name: str, home: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m services.<name>` on 127.0.0.1:port with STRATA_HOME=home; waits for SERVING."""
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"{name}.log"
    full_env = {**os.environ, "STRATA_HOME": str(home), f"STRATA_{name.upper()}_HOST": "127.0.0.1",
                f"STRATA_{name.upper()}_PORT": str(port),
                f"STRATA_{name.upper()}_METRICS_PORT": str(free_port()), **(env or {})}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=full_env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}", proc, log)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
