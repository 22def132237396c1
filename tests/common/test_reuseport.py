"""Round-robin SO_REUSEPORT on the real kernel: listeners joined to a Balancer's group each get the same
share of new connections, an empty slot falls back to the kernel's hash, and the helpers never raise."""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from services.common.reuseport import ENV, Balancer, find_listener, join


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() - before == set(), "the test left file descriptors open"


def make_balancer(slots: int) -> Balancer:
    balancer = Balancer.create(slots)
    assert balancer is not None, (
        "Balancer.create returned None: eBPF SK_REUSEPORT is unavailable (see the strata.reuseport log "
        "line); this machine (root, CAP_BPF, kernel >= 5.12) must support it"
    )
    return balancer


def listeners(n: int) -> list[socket.socket]:
    """n listening sockets on one free 127.0.0.1 port, in one SO_REUSEPORT group."""
    socks: list[socket.socket] = []
    port = 0
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        socks.append(sock)
    return socks


def connect_and_count(port: int, socks: list[socket.socket], n_conns: int) -> list[int]:
    """Opens n_conns connections to port (raising if one is refused) and returns how many each listener
    accepted."""
    counts = [0] * len(socks)
    clients: list[socket.socket] = []
    try:
        for _ in range(n_conns):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        deadline = time.monotonic() + 2
        while sum(counts) < n_conns and time.monotonic() < deadline:
            ready, _, _ = select.select(socks, [], [], 0.1)
            for sock in ready:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                conn.close()
                counts[socks.index(sock)] += 1
    finally:
        for client in clients:
            client.close()
    return counts


@contextmanager
def joined_group(n: int) -> Iterator[list[socket.socket]]:
    """n listeners on one port, each joined to a fresh n-slot Balancer at its own slot."""
    balancer = make_balancer(n)
    socks = listeners(n)
    try:
        env = balancer.env()
        assert all(join(sock.fileno(), i, env) for i, sock in enumerate(socks))
        yield socks
    finally:
        for sock in socks:
            sock.close()
        balancer.close()


@pytest.mark.parametrize("n", [2, 4])
def test_round_robin_spreads_connections_evenly(n: int) -> None:
    with joined_group(n) as socks:
        counts = connect_and_count(socks[0].getsockname()[1], socks, 4 * n)
        assert counts == [4] * n


def test_empty_slot_falls_back_to_hash() -> None:
    with joined_group(2) as socks:
        socks[1].close()  # its worker died: slot 1 is empty
        counts = connect_and_count(socks[0].getsockname()[1], socks[:1], 8)
        assert counts == [8]


def test_balancer_env_and_inheritable_fds() -> None:
    balancer = make_balancer(3)
    try:
        assert len(balancer.fds) == 2
        assert all(os.get_inheritable(fd) for fd in balancer.fds)
        assert balancer.env() == {ENV: f"{balancer.fds[0]},{balancer.fds[1]},3"}
    finally:
        balancer.close()
    assert balancer.fds == ()


def test_join_without_env_returns_false_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with caplog.at_level(logging.INFO, logger="strata.reuseport"):
            assert join(sock.fileno(), 0, {}) is False
            assert join(sock.fileno(), 0, {ENV: "not,a,number"}) is False
    records = [r for r in caplog.records if r.name == "strata.reuseport"]
    assert len(records) == 2
    assert all(r.levelno == logging.INFO for r in records)
    assert ENV in records[0].getMessage()


def test_create_with_no_slots_returns_none() -> None:
    assert Balancer.create(0) is None


def test_find_listener() -> None:
    with socket.socket() as listening, socket.socket() as bound_only:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        bound_only.bind(("127.0.0.1", 0))  # bound, not listening
        assert find_listener(listening.getsockname()[1]) == listening.fileno()
        assert find_listener(bound_only.getsockname()[1]) is None

