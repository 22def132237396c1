"""Benchmark of the drift report (services/monitoring/drift.py).

    .venv/bin/python -m tests.bench.monitoring_drift [--rows 500000] [--rounds 3] [--with-evidently]

Generates a reference and a current window of `--rows` rows each (seed 7) with 15 numeric columns
(normal, skewed, integer-valued, binary; 1-2 % NaN in two of them) and 5 categorical string columns
(3 to 200 categories, one with a category the reference never had); drift is injected in 7 of the
20 columns (mean or scale shifts, heavier tails, moved category shares) and a shift under the
threshold in one more. The data is written as .npy files; each round then runs in a fresh process,
which loads both sides, builds the reference profile, drops the raw reference (as a service keeps
only the profile) and computes the report. It prints per round: profile seconds, report seconds, RSS
after loading the data, and the process's peak RSS (ru_maxrss: the whole process, data included).

--with-evidently runs Evidently's DataDriftPreset (evidently==0.7.23, in its own virtual environment
at --evidently-venv, created when missing; never a dependency of this project) on the same files in
a fresh process, and prints its time (Dataset.from_pandas for both sides and Report.run: it has no
separate profile step), its peak RSS, and the largest difference between its per-column scores and
ours.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUMERIC = [f"n{i:02d}" for i in range(15)]
CATEGORICAL = [f"c{i}" for i in range(5)]
EVIDENTLY = "evidently==0.7.23"
# evidently 0.7.23 imports a pandas 2 internal (pandas.core.dtypes.common.infer_dtype_from_object).
EVIDENTLY_PANDAS = "pandas<3"
EVIDENTLY_METHODS = {"K-S p_value": "ks", "chi-square p_value": "chisquare", "Z-test p_value": "z",
                     "Wasserstein distance (normed)": "wasserstein",
                     "Jensen-Shannon distance": "jensenshannon", "PSI": "psi"}


def generate(rows: int, out: Path) -> None:
    rng = np.random.default_rng(7)

    def save(name: str, ref: np.ndarray, cur: np.ndarray) -> None:
        np.save(out / f"ref_{name}.npy", ref)
        np.save(out / f"cur_{name}.npy", cur)

    def with_nan(x: np.ndarray, share: float) -> np.ndarray:
        x[rng.random(x.size) < share] = np.nan
        return x

    n = rows
    numeric = [  # (reference, current); the drifted ones are marked
        (rng.normal(size=n), rng.normal(size=n)),
        (rng.normal(10, 2, n), rng.normal(10, 2, n)),
        (rng.lognormal(0, 1, n), rng.lognormal(0, 1, n)),
        (rng.exponential(3, n), rng.exponential(3, n)),
        (rng.uniform(-5, 5, n), rng.uniform(-5, 5, n)),
        (rng.normal(size=n), rng.normal(0.3, 1, n)),                                 # drift: mean
        (rng.normal(size=n), rng.normal(0, 1.5, n)),                                 # drift: scale
        (rng.lognormal(0, 1, n), rng.lognormal(0.2, 1, n)),                          # drift: skewed shift
        (rng.poisson(3, n).astype(float), rng.poisson(3, n).astype(float)),          # <= 20 values
        (rng.poisson(3, n).astype(float), rng.poisson(3.6, n).astype(float)),        # drift
        (with_nan(rng.uniform(0, 1, n), 0.02), with_nan(rng.uniform(0, 1, n), 0.02)),
        (with_nan(rng.normal(size=n), 0.01),                                         # drift: heavier tail
         with_nan(np.where(rng.random(n) < 0.1, rng.normal(0, 4, n), rng.normal(size=n)), 0.01)),
        ((rng.random(n) < 0.3).astype(float), (rng.random(n) < 0.3).astype(float)),  # binary: Jensen-Shannon
        (rng.gamma(2, 2, n), rng.gamma(2, 2, n)),
        (rng.normal(size=n), rng.normal(0.02, 1, n)),                                # under the threshold
    ]
    for name, (ref, cur) in zip(NUMERIC, numeric, strict=True):
        save(name, ref, cur)

    def words(k: int) -> np.ndarray:
        return np.array([f"cat_{i:03d}" for i in range(k)])

    def shares(k: int, skew: float) -> np.ndarray:
        p = np.exp(-skew * np.arange(k) / k)
        return p / p.sum()

    categorical = [
        (words(3), shares(3, 0.5), words(3), shares(3, 0.5)),
        (words(8), shares(8, 1.0), words(8), shares(8, 1.0)[::-1]),                  # drift: shares reversed
        (words(20), shares(20, 2.0), words(20), shares(20, 2.0)),
        (words(50), shares(50, 1.0), words(51), np.append(shares(50, 1.0) * 0.7, 0.3)),  # drift: new category
        (words(200), shares(200, 3.0), words(200), shares(200, 3.0)),
    ]
    for name, (ref_words, ref_p, cur_words, cur_p) in zip(CATEGORICAL, categorical, strict=True):
        save(name, rng.choice(ref_words, n, p=ref_p), rng.choice(cur_words, n, p=cur_p))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(data: Path) -> None:
    """One round, in a fresh process: prints one JSON line."""
    from services.monitoring.drift import ColumnKind, ReferenceProfile, drift_report

    names = NUMERIC + CATEGORICAL
    ref = {name: np.load(data / f"ref_{name}.npy") for name in names}
    cur = {name: np.load(data / f"cur_{name}.npy") for name in names}
    rss_loaded = _rss_mb()
    kinds = {name: ColumnKind.CATEGORICAL for name in CATEGORICAL}
    t0 = time.perf_counter()
    profile = ReferenceProfile.from_columns(ref, kinds)
    profile_s = time.perf_counter() - t0
    del ref
    peak_profile = _peak_rss_mb()
    t0 = time.perf_counter()
    report = drift_report(profile, cur)
    report_s = time.perf_counter() - t0
    print(json.dumps({
        "profile_s": profile_s, "report_s": report_s, "rss_loaded_mb": rss_loaded,
        "peak_rss_after_profile_mb": peak_profile, "peak_rss_mb": _peak_rss_mb(),
        "n_drifted": report.n_drifted, "dataset_drifted": report.dataset_drifted,
        "features": {f.name: [str(f.method), f.score, f.drifted] for f in report.features},
    }))


EVIDENTLY_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np, pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.presets import DataDriftPreset

data, numeric, categorical = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")
frames = {side: pd.DataFrame({n: np.load(data / f"{side}_{n}.npy") for n in numeric + categorical})
          for side in ("ref", "cur")}
definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
t0 = time.perf_counter()
ref = Dataset.from_pandas(frames["ref"], data_definition=definition)
cur = Dataset.from_pandas(frames["cur"], data_definition=definition)
snapshot = Report([DataDriftPreset()]).run(cur, ref)
seconds = time.perf_counter() - t0
features = {m["config"]["column"]: [m["config"]["method"], m["value"]]
            for m in snapshot.dict()["metrics"] if m["config"]["type"].endswith(":ValueDrift")}
peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"report_s": seconds, "peak_rss_mb": peak_rss_mb, "features": features}))
"""


def _evidently_python(venv: Path) -> Path | None:
    """The venv's python with evidently importable, creating the venv when needed; None (and why,
    printed) when pip cannot install it."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import evidently"],
                                          capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with {EVIDENTLY} ({EVIDENTLY_PANDAS}) ...", flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [python, "-m", "pip", "install", "-q", EVIDENTLY, EVIDENTLY_PANDAS]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"evidently: could not install ({' '.join(map(str, step))}): {done.stderr.strip()[-500:]}")
            return None
    return python


def _run_json(cmd: list) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=500_000, help="rows on each side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--with-evidently", action="store_true")
    ap.add_argument("--evidently-venv", type=Path, default=Path("/tmp/evidently-venv"))
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return

    data = Path(tempfile.mkdtemp(prefix="strata-drift-bench-"))
    try:
        t0 = time.perf_counter()
        generate(args.rows, data)
        print(f"{args.rows} reference + {args.rows} current rows x {len(NUMERIC)} numeric + "
              f"{len(CATEGORICAL)} categorical columns (generated in {time.perf_counter() - t0:.1f} s); "
              "each round a fresh process", flush=True)
        rounds = []
        for r in range(args.rounds):
            out = _run_json([sys.executable, "-m", "tests.bench.monitoring_drift", "--child", str(data)])
            rounds.append(out)
            print(f"round {r + 1}: profile {out['profile_s']:.3f} s, report {out['report_s']:.3f} s, "
                  f"RSS after loading the data {out['rss_loaded_mb']:.0f} MB, peak RSS after the profile "
                  f"{out['peak_rss_after_profile_mb']:.0f} MB, peak RSS {out['peak_rss_mb']:.0f} MB, "
                  f"drifted {out['n_drifted']}/{len(out['features'])}", flush=True)
        print(f"median: profile {statistics.median(o['profile_s'] for o in rounds):.3f} s, report "
              f"{statistics.median(o['report_s'] for o in rounds):.3f} s, peak RSS "
              f"{statistics.median(o['peak_rss_mb'] for o in rounds):.0f} MB")
        ours = rounds[-1]["features"]
        print("per feature: " + ", ".join(f"{n} {m} {s:.4g}{' DRIFT' if d else ''}"
                                          for n, (m, s, d) in ours.items()))

        if args.with_evidently:
            python = _evidently_python(args.evidently_venv)
            if python is not None:
                child_py = data / "evidently_child.py"
                child_py.write_text(EVIDENTLY_CHILD)
                ev = _run_json([python, child_py, data, ",".join(NUMERIC), ",".join(CATEGORICAL)])
                diffs = {}
                for name, (method, score) in ev["features"].items():
                    assert EVIDENTLY_METHODS[method] == ours[name][0], (name, method, ours[name])
                    diffs[name] = abs(score - ours[name][1])
                worst = max(diffs, key=diffs.get)
                print(f"evidently {EVIDENTLY} DataDriftPreset: {ev['report_s']:.3f} s (from_pandas + run), "
                      f"peak RSS {ev['peak_rss_mb']:.0f} MB; same method for all {len(diffs)} columns, "
                      f"largest |score difference| {diffs[worst]:.3g} ({worst})")
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
