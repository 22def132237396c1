"""Process-wide settings for a serving process's latency, applied by `server.run` (Linux): the
collector frozen after start-up, a 0.5 ms GIL switch interval, and every thread but the event
loop's as SCHED_BATCH (`STRATA_BATCH_HELPER_THREADS=off` opts out).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading


def threads_per_process(processes: int) -> int:
    """The cores each of `processes` processes sharing this machine may keep busy (at least one):
    ONNX Runtime's intra-op threads per serving process, OpenMP's per training worker."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def _tune_for_latency() -> None:
    """Once a serving process has started (only there: these settings are process-wide).
    Everything loaded so far (modules, definitions, models) is long-lived, so the collector need
    never scan it again (a full collection over it is a pause of tens of ms). Threads beside the
    event loop (grpc's poller, the prediction log, heartbeats, store reads) may hold the GIL for
    at most 0.5 ms before the loop gets it back (the default is 5 ms, which shows in p99)."""
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(0.0005)


BATCH_HELPERS_ENV = "STRATA_BATCH_HELPER_THREADS"


def batch_helper_threads(loop_tid: int) -> None:
    """Every thread of this process but the event loop's runs as SCHED_BATCH. grpc's threads (its event-engine I/O pool, the completion-queue poller), store
    reads in worker threads and ONNX Runtime's pool wake several times per call; as normal
    threads on the serving process's core each wake-up preempts the interpreter mid-call (about
    20 % of the process's samples went to context switches). A SCHED_BATCH thread never preempts
    on wake-up: it runs when the loop waits (between calls, on every Redis round trip) or at the
    next scheduler tick, and keeps its fair share. Measured on two cores, three pairs each:
    features 100 x 20 CPU per call -11 to -19 % at 8x1 and 1x8, p99 at 1x8 5.0-6.0 -> 3.9-4.2 ms;
    inference b1 8x1 362 -> 306-319 us per request (docs/performance.md)."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux
        return
    for tid in tids:
        if tid == loop_tid:
            continue
        try:
            if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except OSError:  # the thread ended meanwhile
            pass


async def _keep_helper_threads_batched() -> None:
    """Threads start later too (worker threads on first use, grpc's pool grows), so the scan
    repeats every second: a few syscalls for a dozen threads."""
    loop_tid = threading.get_native_id()
    while True:
        batch_helper_threads(loop_tid)
        await asyncio.sleep(1.0)
