"""Several serving processes of one service on one port (services/common/workers.py)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.processes import free_port, start_service, stop_process


def _sockets_per_process(pids: list[int], port: int, state: str = "01") -> list[int]:
    """TCP sockets on local `port` in `state` (01: ESTABLISHED, 0A: LISTEN) held by each process
    (its socket fds matched against /proc/net/tcp by inode)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == state:
                inodes.add(f[9])
    counts = []
    for pid in pids:
        n = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                n += link.startswith("socket:[") and link[8:-1] in inodes
        counts.append(n)
    return counts


def test_serving_processes_take_connections_in_turn(tmp_path: Path) -> None:
    """A real service with two serving processes on one port: 4 client channels end 2:2 every time
    (the kernel's hash alone gives 3:1 or 4:0 more often than not)."""
    port = free_port()
    proc = start_service("features", tmp_path / "home", port,
                         {"STRATA_FEATURES_WORKERS": "2", "STRATA_AUTH": "disabled"})
    try:
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(children) == 2
        # As many workers as CPUs: one CPU each; otherwise left to the scheduler.
        cpus = os.sched_getaffinity(0)
        affinity = sorted(sorted(os.sched_getaffinity(c)) for c in children)
        assert affinity == ([[c] for c in sorted(cpus)] if len(cpus) == 2 else [sorted(cpus)] * 2)
        # The service is SERVING once one process is; the other may still be starting.
        deadline = time.monotonic() + 20
        while min(_sockets_per_process(children, port, "0A")) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # listening, then joining the round-robin group
        for _ in range(3):
            before = _sockets_per_process(children, port)
            channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                        for _ in range(4)]
            for ch in channels:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            after = _sockets_per_process(children, port)
            assert sorted(a - b for a, b in zip(after, before, strict=True)) == [2, 2], (before, after)
            for ch in channels:
                ch.close()
            time.sleep(0.3)  # closed connections leave before the next round counts
    finally:
        stop_process(proc)


def _policies(pid: int) -> dict[int, int]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out[int(task.name)] = os.sched_getscheduler(int(task.name))
    return out


def test_helper_threads_run_as_batch_beside_the_event_loop(tmp_path: Path) -> None:
    """In a serving process every thread but the event loop's (grpc's pool and poller, worker
    threads) is SCHED_BATCH, so none of them preempts the interpreter when it wakes; the loop's
    thread stays a normal one. STRATA_BATCH_HELPER_THREADS=off leaves them all normal."""
    for setting, helper_policy in (("on", os.SCHED_BATCH), ("off", os.SCHED_OTHER)):
        port = free_port()
        proc = start_service("features", tmp_path / setting, port,
                             {"STRATA_FEATURES_WORKERS": "1", "STRATA_AUTH": "disabled",
                              "STRATA_BATCH_HELPER_THREADS": setting})
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            deadline = time.monotonic() + 5
            while True:
                policies = _policies(proc.pid)
                helpers = {p for tid, p in policies.items() if tid != proc.pid}
                if helpers == {helper_policy} or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert len(policies) > 3  # grpc's threads are there
            assert policies[proc.pid] == os.SCHED_OTHER
            assert helpers == {helper_policy}, policies
        finally:
            stop_process(proc)
