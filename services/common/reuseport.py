"""Round-robin assignment of new connections over the serving processes of one SO_REUSEPORT port.

Why: with SO_REUSEPORT the kernel picks the listener of a new connection by a hash of its 4-tuple. With
many connections that evens out, but a service usually has few (long-lived gRPC channels): 4 connections
over 2 processes end 3:1 or 4:0 most of the time, and the busy process's tail latency doubles.

How: the parent (`Balancer.create`) loads a tiny eBPF program of type SK_REUSEPORT and two maps: a
REUSEPORT_SOCKARRAY with one slot per worker, and a one-entry ARRAY holding a counter. Each worker, once
listening, puts its listener at its slot and attaches the program to the port's group (`join`). For every
new connection the program does, in words:

    n = atomic fetch-and-add(counter, 1)       # the old value
    bpf_sk_select_reuseport(ctx, sockarray, n % slots)
    return SK_PASS

If the slot is empty (its worker died, so its socket closed and left the map), the helper fails, nothing is
selected, and the kernel falls back to its hash over the sockets still open: no connection is refused.

Fallback: where any of this is unavailable (not Linux, no CAP_BPF, a kernel older than 5.12 without atomic
fetch-and-add, the verifier refuses), the public functions never raise: they log one INFO line on the
"strata.reuseport" logger saying why and the port keeps plain SO_REUSEPORT hashing.

No compiler: the instructions are assembled here (`struct bpf_insn`) and bpf(2) is called through ctypes,
with `union bpf_attr` filled at the offsets of include/uapi/linux/bpf.h.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import socket
import struct
from collections.abc import Mapping

log = logging.getLogger("strata.reuseport")

ENV = "STRATA_REUSEPORT_BPF"  # "sockarray_fd,prog_fd,slots" handed from parent to workers
SLOT_ENV = "STRATA_REUSEPORT_SLOT"  # this worker's slot

_SYSCALL_BPF = {"x86_64": 321, "amd64": 321, "aarch64": 280, "arm64": 280}
# bpf(2) commands, map/program types, helpers (include/uapi/linux/bpf.h)
_BPF_MAP_CREATE, _BPF_MAP_UPDATE_ELEM, _BPF_PROG_LOAD = 0, 2, 5
_MAP_ARRAY, _MAP_REUSEPORT_SOCKARRAY = 2, 20
_PROG_SK_REUSEPORT = 21  # expected_attach_type 0 is read as BPF_SK_REUSEPORT_SELECT
_FUNC_MAP_LOOKUP_ELEM, _FUNC_SK_SELECT_REUSEPORT = 1, 82
_PSEUDO_MAP_FD = 1
_SK_PASS = 1
_SO_ATTACH_REUSEPORT_EBPF = 52
_ATTR_SIZE = 128
_LOG_SIZE = 64 * 1024
_LICENSE = b"Apache-2.0\0"

# Opcodes: class | op | source (BPF_K immediate, BPF_X register).
_MOV64_X, _MOV64_K, _ADD64_K, _MOD64_K = 0xBF, 0xB7, 0x07, 0x97
_LD_IMM64 = 0x18
_ST_W, _STX_W = 0x62, 0x63  # *(u32 *)(dst + off) = imm / src
_ATOMIC_DW, _ADD_FETCH = 0xDB, 0x01  # BPF_STX | BPF_DW | BPF_ATOMIC, imm = BPF_ADD | BPF_FETCH
_JEQ_K, _CALL, _EXIT = 0x15, 0x85, 0x95
_R0, _R1, _R2, _R3, _R4, _R6, _R10 = 0, 1, 2, 3, 4, 6, 10


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _ld_map_fd(dst: int, map_fd: int) -> bytes:
    return _insn(_LD_IMM64, dst, _PSEUDO_MAP_FD, 0, map_fd) + _insn(0)  # two slots


def _program(counter_fd: int, sockarray_fd: int, slots: int) -> bytes:
    select = [
        # r1 = 1; r1 = atomic_fetch_add(*(u64 *)r0, r1): the old counter
        _insn(_MOV64_K, _R1, imm=1),
        _insn(_ATOMIC_DW, _R0, _R1, 0, _ADD_FETCH),
        # key = r1 % slots, as u32 at fp-8
        _insn(_MOD64_K, _R1, imm=slots),
        _insn(_STX_W, _R10, _R1, -8),
        # bpf_sk_select_reuseport(ctx, sockarray, &key, 0); its error (empty slot) is ignored
        _insn(_MOV64_X, _R1, _R6),
        _ld_map_fd(_R2, sockarray_fd),
        _insn(_MOV64_X, _R3, _R10),
        _insn(_ADD64_K, _R3, imm=-8),
        _insn(_MOV64_K, _R4, imm=0),
        _insn(_CALL, imm=_FUNC_SK_SELECT_REUSEPORT),
    ]
    n_select = sum(len(i) for i in select) // 8
    return b"".join(
        [
            # r6 = ctx
            _insn(_MOV64_X, _R6, _R1),
            # r0 = bpf_map_lookup_elem(counter, &(u32)0 at fp-4)
            _insn(_ST_W, _R10, 0, -4, 0),
            _insn(_MOV64_X, _R2, _R10),
            _insn(_ADD64_K, _R2, imm=-4),
            _ld_map_fd(_R1, counter_fd),
            _insn(_CALL, imm=_FUNC_MAP_LOOKUP_ELEM),
            # if r0 == NULL skip the selection (the verifier insists)
            _insn(_JEQ_K, _R0, 0, n_select, 0),
            *select,
            # return SK_PASS: no selection means the kernel's hash
            _insn(_MOV64_K, _R0, imm=_SK_PASS),
            _insn(_EXIT),
        ]
    )


class _BpfError(OSError):
    pass


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    if platform.system() != "Linux":
        raise _BpfError(f"not Linux ({platform.system()})")
    nr = _SYSCALL_BPF.get(platform.machine().lower())
    if nr is None:
        raise _BpfError(f"bpf(2) syscall number unknown for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), attr, ctypes.c_ulong(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise _BpfError(err, os.strerror(err))
    return int(ret)


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


def _map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIII", attr, 0, map_type, key_size, value_size, max_entries)
    return _bpf(_BPF_MAP_CREATE, attr)


def _map_update(map_fd: int, key: bytes, value: bytes) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("<IIQQQ", attr, 0, map_fd, 0, _addr(k), _addr(v), 0)  # flags BPF_ANY
    _bpf(_BPF_MAP_UPDATE_ELEM, attr)


def _prog_load(insns: bytes) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(_LICENSE, len(_LICENSE))
    vlog = ctypes.create_string_buffer(_LOG_SIZE)
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf; prog_name at 48
    struct.pack_into(
        "<IIQQIIQ",
        attr,
        0,
        _PROG_SK_REUSEPORT,
        len(insns) // 8,
        _addr(code),
        _addr(lic),
        1,
        _LOG_SIZE,
        _addr(vlog),
    )
    struct.pack_into("16s", attr, 48, b"strata_rr")
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except OSError as e:
        lines = vlog.value.decode(errors="replace").strip().splitlines()
        raise _BpfError(f"{e}; verifier: {' | '.join(lines[-4:]) or '(no log)'}") from e


def _close_all(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Balancer:
    """In the parent (supervisor) process, before it starts the workers."""

    def __init__(self, sockarray_fd: int, prog_fd: int, slots: int) -> None:
        self.fds: tuple[int, ...] = (sockarray_fd, prog_fd)
        self.slots = slots

    @classmethod
    def create(cls, slots: int) -> Balancer | None:
        """The program and its maps, or None (one INFO log line why) where BPF is unavailable."""
        fds: list[int] = []
        try:
            if not 1 <= slots <= 1 << 16:
                raise _BpfError(f"slots must be 1..65536, not {slots}")
            counter = _map_create(_MAP_ARRAY, 4, 8, 1)
            fds.append(counter)
            sockarray = _map_create(_MAP_REUSEPORT_SOCKARRAY, 4, 8, slots)  # value: the socket fd as u64
            fds.append(sockarray)
            prog = _prog_load(_program(counter, sockarray, slots))
            fds.append(prog)
            os.close(fds.pop(0))  # the program holds the counter
            for fd in fds:
                os.set_inheritable(fd, True)
        except Exception as e:  # noqa: BLE001 - any failure means plain hashing
            _close_all(fds)
            log.info("round-robin SO_REUSEPORT unavailable, the kernel's hash spreads connections: %s", e)
            return None
        return cls(sockarray, prog, slots)

    def env(self) -> dict[str, str]:
        """{ENV: "sockarray_fd,prog_fd,slots"} for the workers' environment."""
        return {ENV: f"{self.fds[0]},{self.fds[1]},{self.slots}"}

    def close(self) -> None:
        _close_all(self.fds)
        self.fds = ()


def join(sock_fd: int, slot: int, env: Mapping[str, str] | None = None) -> bool:
    """In a worker, once its listener is listening: put the listening socket `sock_fd` at `slot` of the
    group's map (BPF_ANY, so a restarted worker replaces its old socket) and attach the program to the
    group (SO_ATTACH_REUSEPORT_EBPF). False (one INFO log line why) if ENV is absent or anything fails."""
    value = (os.environ if env is None else env).get(ENV)
    try:
        if not value:
            raise _BpfError(f"{ENV} not set")
        sockarray_fd, prog_fd, slots = (int(x) for x in value.split(","))
        if not 0 <= slot < slots:
            raise _BpfError(f"slot {slot} outside 0..{slots - 1}")
        _map_update(sockarray_fd, struct.pack("<I", slot), struct.pack("<Q", sock_fd))
        with socket.socket(fileno=os.dup(sock_fd)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_EBPF, prog_fd)
    except Exception as e:  # noqa: BLE001 - any failure means plain hashing
        log.info(
            "round-robin SO_REUSEPORT not joined (slot %s), the kernel's hash spreads connections: %s",
            slot,
            e,
        )
        return False
    return True


def find_listener(port: int) -> int | None:
    """The fd of this process's TCP socket (AF_INET or AF_INET6) listening on `port`, or None. grpc
    creates its listener internally, so this is how a worker finds it. Where several listen on the port
    (separate v4 and v6 sockets), the lowest fd is returned; a dual-stack "[::]" listener is one socket."""
    try:
        names = sorted(int(n) for n in os.listdir("/proc/self/fd"))
    except OSError:
        return None
    for fd in names:
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            dup = os.dup(fd)
            try:
                sock = socket.socket(fileno=dup)
            except OSError:
                os.close(dup)
                raise
            with sock:
                if (
                    sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port
                ):
                    return fd
        except OSError:  # closed meanwhile, or not a socket we can query
            continue
    return None


def join_listener(port: int) -> bool:
    """In a worker whose server listens on `port`: join the parent's balancer at the slot the parent
    gave it (SLOT_ENV). False (logged) where there is no balancer or no listener."""
    fd = find_listener(port)
    if fd is None:
        log.info("round-robin SO_REUSEPORT not joined: no listener on port %s found", port)
        return False
    return join(fd, int(os.environ.get(SLOT_ENV, "0")))
