"""Benchmark of the offline store's point-in-time retrieval (services/features/offline.py).

    .venv/bin/python -m tests.bench.features_offline [--entity-rows 1000000] [--source-rows 10000000]
        [--out DIR] [--threads N] [--filter-by-created-timestamp]

Generates two feature views as Parquet (half the source rows each, in files of <= 1M rows so that
generation itself stays small in memory): `user_stats` keyed by user_id (int64, 100k users, 10
float64 features, ttl 7 days) and `merchant_stats` keyed by merchant_id (string, 10k merchants, 5
float64 + 5 int64 features, no ttl), event times over 30 days with a created timestamp, some
nulls. Then asks for 20 features for the entity rows (user and merchant drawn at random, times
over the same 30 days plus one day) and prints JSON: retrieval seconds (generation excluded),
rows/s, peak RSS of the process and the cpu count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from services.features.offline import ViewSpec, historical_features, write_parquet

USERS, MERCHANTS, DAYS, FILE_ROWS = 100_000, 10_000, 30, 1_000_000
START_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
SPAN_US = DAYS * 86_400 * 1_000_000


def _ts(us: np.ndarray) -> pa.Array:
    return pa.array(us, pa.timestamp("us", tz="UTC"))


def _write_view(root: Path, name: str, rows: int, rng: np.random.Generator) -> None:
    for part, lo in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - lo)
        ts = START_US + rng.integers(0, SPAN_US, n)
        cols: dict[str, pa.Array] = {}
        if name == "user_stats":
            cols["user_id"] = pa.array(rng.integers(0, USERS, n))
            for j in range(10):
                cols[f"u{j}"] = pa.array(rng.random(n), mask=rng.random(n) < 0.01)
        else:
            cols["merchant_id"] = pa.array(np.char.add("m", rng.integers(0, MERCHANTS, n).astype(str)))
            for j in range(5):
                cols[f"m{j}"] = pa.array(rng.random(n), mask=rng.random(n) < 0.01)
            for j in range(5, 10):
                cols[f"m{j}"] = pa.array(rng.integers(0, 1000, n))
        cols["event_ts"] = _ts(ts)
        cols["created_ts"] = _ts(ts + rng.integers(0, 60_000_000, n))
        write_parquet(pa.table(cols), root / name / f"part-{part:04d}.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entity-rows", type=int, default=1_000_000)
    ap.add_argument("--source-rows", type=int, default=10_000_000, help="in all, split over the two views")
    ap.add_argument("--out", type=Path, help="data directory (kept); default: a temporary one, removed")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--filter-by-created-timestamp", action="store_true",
                    help="the created-time cutoff too (a running arg_max per key before the ASOF join)")
    args = ap.parse_args()

    root = args.out or Path(tempfile.mkdtemp(prefix="strata-offline-bench-"))
    try:
        rng = np.random.default_rng(7)
        t0 = time.perf_counter()
        _write_view(root, "user_stats", args.source_rows // 2, rng)
        _write_view(root, "merchant_stats", args.source_rows - args.source_rows // 2, rng)
        n = args.entity_rows
        entities = pa.table({
            "user_id": pa.array(rng.integers(0, USERS, n)),
            "merchant_id": pa.array(np.char.add("m", rng.integers(0, MERCHANTS, n).astype(str))),
            "event_timestamp": _ts(START_US + rng.integers(0, SPAN_US + 86_400_000_000, n)),
        })
        generate_s = time.perf_counter() - t0
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        views = [
            ViewSpec("user_stats", ("user_id",), tuple(f"u{j}" for j in range(10)), "event_ts", "created_ts",
                     7 * 86_400, str(root / "user_stats" / "*.parquet")),
            ViewSpec("merchant_stats", ("merchant_id",), tuple(f"m{j}" for j in range(10)), "event_ts",
                     "created_ts", 0, str(root / "merchant_stats" / "*.parquet")),
        ]
        wanted = [(v.name, f) for v in views for f in v.features]
        t0 = time.perf_counter()
        result = historical_features(entities, views, wanted, threads=args.threads,
                                     filter_by_created_timestamp=args.filter_by_created_timestamp)
        seconds = time.perf_counter() - t0
        matched = {v.name: 1 - result.column(f"{v.name}__{v.features[-1]}").null_count / max(n, 1)
                   for v in views}
        print(json.dumps({
            "entity_rows": n,
            "source_rows": args.source_rows,
            "features": len(wanted),
            "seconds": round(seconds, 3),
            "rows_per_s": round(n / seconds),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_mb_before_retrieval": round(rss_before, 1),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "filter_by_created_timestamp": args.filter_by_created_timestamp,
            "generate_seconds": round(generate_s, 1),
            "matched_fraction": {k: round(v, 4) for k, v in matched.items()},
        }, indent=2))
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
