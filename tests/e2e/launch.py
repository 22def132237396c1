"""`strata up` as a user runs it, for the end-to-end tests: the installed `strata` command as a
process with its own environment (ports only through STRATA_* variables), its output in a log,
and every child it started stopped afterwards, also when a test failed."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.processes import ROOT, free_port

STRATA = str(Path(sys.executable).parent / "strata")
SERVICES = ("registry", "features", "training", "monitoring", "inference")


@dataclass
class Launched:
    proc: subprocess.Popen
    log: Path
    home: Path
    env: dict[str, str]

    def output(self) -> str:
        return self.log.read_text()

    def token(self, role: str) -> str:
        """The development token of `role` that strata up wrote to HOME/tokens.env."""
        m = re.search(rf"^export STRATA_{role.upper()}_TOKEN=(\S+)$", (self.home / "tokens.env").read_text(), re.M)
        assert m, f"no {role} token in {self.home / 'tokens.env'}"
        return m.group(1)

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} not in the output of strata up (exit {self.proc.poll()}):\n"
                             f"{self.output()[-4000:]}")


def port_env() -> dict[str, str]:
    """Every port of a local platform, free now, as the STRATA_* variables that set them."""
    env = {}
    for name in SERVICES:
        env[f"STRATA_{name.upper()}_PORT"] = str(free_port())
        env[f"STRATA_{name.upper()}_METRICS_PORT"] = str(free_port())
    env["STRATA_GATEWAY_PORT"] = str(free_port())
    env["STRATA_GATEWAY_ADMIN_PORT"] = str(free_port())
    env["STRATA_MLFLOW_PORT"] = str(free_port())
    return env


#: A user's shell that has not activated the project's venv (as after `make up`).
SHELL_PATH = "/usr/local/bin:/usr/bin:/bin"


def clean_environ() -> dict[str, str]:
    """This process's environment without any STRATA_* setting and with the PATH of a shell
    that has not activated the venv (a user's fresh shell)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env["PATH"] = SHELL_PATH
    return env


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def strata_up(home: Path, env: dict[str, str], *args: str) -> Iterator[Launched]:
    """Start `strata up --home HOME ARGS` with `env` on top of a clean environment."""
    log = home.parent / f"{home.name}-up.log"
    full_env = {**clean_environ(), **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen([STRATA, "up", "--home", str(home), *args], cwd=ROOT, env=full_env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    launched = Launched(proc, log, home, full_env)
    try:
        yield launched
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # The children run in sessions of their own: none may outlive a failed test.
        for pid in re.findall(r"(?:up|restarted) \(pid (\d+)\)", log.read_text()):
            if alive(int(pid)):
                os.kill(int(pid), signal.SIGTERM)


def strata(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `strata` command with `env` on top of a clean environment."""
    return subprocess.run([STRATA, *args], cwd=ROOT, env={**clean_environ(), **env}, capture_output=True,
                          text=True, timeout=timeout, check=False)


def strata_sourced(home: Path, env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`source HOME/tokens.env && strata ARGS`, as the README has users run the CLI: the token
    and the client TLS settings come from the file `strata up` wrote."""
    return subprocess.run(["bash", "-c", f'source {home / "tokens.env"} && exec "$0" "$@"', STRATA, *args],
                          cwd=ROOT, env={**clean_environ(), **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)


def printed_commands(output: str) -> list[str]:
    """The commands the demo printed for the user to repeat (its `$ ...` lines)."""
    return [line[2:] for line in output.splitlines() if line.startswith("$ ")]


def run_pasted(commands: list[str], home: Path, cwd: Path) -> list[tuple[str, subprocess.CompletedProcess[str]]]:
    """Each command as a user pastes it into a fresh shell (nothing from the project's venv on
    PATH) after `source <home>/tokens.env`, as the demo says."""
    shell_env = {"PATH": SHELL_PATH, "HOME": str(cwd), "LANG": "C.UTF-8"}
    results = []
    for cmd in commands:
        r = subprocess.run(["bash", "-c", f"source {home / 'tokens.env'} && {cmd}"], cwd=cwd, env=shell_env,
                           capture_output=True, text=True, timeout=60, check=False)
        results.append((cmd, r))
    return results


def check_pasted(results: list[tuple[str, subprocess.CompletedProcess[str]]], demo_output: str,
                 cwd: Path) -> None:
    """Every pasted command succeeded and answered what the demo got: JSON that is not an error,
    the model file with the sha256 the demo verified, an HTML drift report."""
    assert len(results) >= 5, f"the demo printed too few commands: {[c for c, _ in results]}"
    digest = re.search(r"sha256 matches: ([0-9a-f]{64})", demo_output)
    assert digest, demo_output[-3000:]
    for cmd, r in results:
        assert r.returncode == 0, f"{cmd}\nexit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        out_file = re.search(r" -o (\S+)", cmd)
        if out_file and out_file.group(1).endswith(".html"):  # the monitoring's drift report page
            page = (cwd / out_file.group(1)).read_text()
            assert page.lstrip().lower().startswith("<!doctype html") and "drift" in page.lower(), f"{cmd}: {page[:500]}"
            continue
        if out_file:
            got = hashlib.sha256((cwd / out_file.group(1)).read_bytes()).hexdigest()
            assert got == digest.group(1), f"{cmd}: downloaded file sha256 {got}"
            continue
        try:
            body = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"{cmd}\nnot JSON:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}") from None
        assert not ({"code", "message"} <= set(body)), f"{cmd}\nanswered an error: {body}"
