"""Child processes kept running: restarted with backoff when they exit, stopped together.
Used by `strata up` (the platform's services) and by the inference service (its workers)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("strata.supervisor")


@dataclass
class Child:
    name: str
    argv: list[str]
    #: None: the child writes to this process's stdout/stderr.
    log_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: File descriptors the child inherits (e.g. the connection balancer's BPF program and map).
    pass_fds: tuple[int, ...] = ()
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)  # times of recent restarts
    next_start: float = 0.0

    def start(self) -> None:
        env = {**os.environ, **self.env}
        if self.log_path is None:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                         pass_fds=self.pass_fds)
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, pass_fds=self.pass_fds,
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
