"""Strata side by side with KServe and MLServer (issue 17), on this machine, with h2load.

    .venv/bin/python -m tests.bench.serving_peers [--seconds 8] [--rounds 4] [--cells a,b,c,d]
        [--peers kserve,mlserver] [--mlserver-workers 0] [--json out.json]

One model for every server: a scikit-learn StandardScaler + MLPClassifier (hidden 128, 64) on 32
float inputs, trained here on a fixed synthetic set and exported with skl2onnx (outputs `label`,
INT64, and `probabilities`, FP32 [N, 2]; no ZipMap), run by onnxruntime on CPU with one intra-op
thread in every server. Each peer is installed once, with pinned versions, into a virtualenv of
its own under .bench/peers/ (never into the project's), and serves the model through a small
script of tests/bench/peers/:

- Strata: the inference service with its defaults (one serving process per core, pinned, dynamic
  batching max 64, prediction log on), auth off (STRATA_AUTH=disabled), registry beside it; set
  up with tests/bench/inference_load.py's pieces.
- KServe 0.21.0: `kserve.ModelServer` with a `kserve.Model` running onnxruntime
  (peers/kserve_server.py), gRPC V2 server, KSERVE_LOGLEVEL=WARNING, latency logging off.
- MLServer 1.7.1: a custom runtime (`mlserver.MLModel`, peers/mlserver_runtime.py),
  `parallel_workers` from --mlserver-workers (default 0: inference in the process that serves
  gRPC; 1 and 2 add a multiprocessing hop per request that costs more than this model, and were
  2.4-3.5x slower at 1x1 and 4x8 in a quick check on 2 cores), debug off, adaptive batching off.

Before measuring, one ModelInfer per batch size to each server (the exact bytes h2load will send,
through curl) must give the probabilities that onnxruntime computes in this process (within
1e-5) and the same labels, with grpc-status 0; the harness aborts otherwise. The size of that
reply is what every h2load reply must measure: h2load's DATA bytes / succeeded requests is
checked against it (an error reply carries no message).

Cells (h2load posting one pre-framed V2 ModelInfer with raw_input_contents, one thread):
  a: batch 1, 1 connection x 8 streams      b: batch 1, 4 connections x 8 streams
  c: batch 32, 1 connection x 8 streams     d: batch 1, 1 connection x 1 stream (latency)
Each cell is a 1 s h2load warm-up followed by the measured run of --seconds. Servers run in turn,
alternating order per round (Strata, KServe, MLServer; then the reverse); every round is reported.

Server CPU per request: utime + stime (/proc/PID/stat) of the server's process and all its
descendants, read right before and right after the measured h2load run, divided by the requests
h2load completed (succeeded + failed). Requests still in flight when h2load stops are served (and
cost CPU) but are not counted: at most connections x streams per run, under 1 % of a run here.

Prediction log (Strata): after each round's Strata cells, the records in the .binpb files under
its STRATA_HOME/inference/predictions (read with services.inference.predlog.read_frames) are
counted against the requests h2load saw succeed (warm-ups and measured runs) plus the curl probes.
The log may hold more, never fewer: requests in flight when a run's duration ends are scored and
logged but never reported to h2load; the difference must be at most the started-but-not-done
requests h2load reports plus the streams of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.processes import ROOT, free_port, start_service, stop_process

# The peers' pins: installed into their own virtualenvs, never into the project's.
KSERVE = "kserve==0.21.0"
MLSERVER = "mlserver==1.7.1"
ONNXRUNTIME = "onnxruntime==1.32.0"  # the project's own pin (pyproject.toml)
NUMPY = "numpy==2.4.6"
# MLServer 1.7.1 requires uvloop unpinned; uvloop 0.22+ no longer creates a loop in
# asyncio.get_event_loop(), which MLServer's parallel workers call at start (they die at once:
# "There is no current event loop in thread 'MainThread'"). 0.21.0 is the release MLServer 1.7.1 met.
UVLOOP_FOR_MLSERVER = "uvloop==0.21.0"
PEER_PACKAGES = {"kserve": [KSERVE, ONNXRUNTIME, NUMPY], "mlserver": [MLSERVER, ONNXRUNTIME, NUMPY, UVLOOP_FOR_MLSERVER]}
PEERS_DIR = ROOT / ".bench" / "peers"
SCRIPTS = Path(__file__).resolve().parent / "peers"

MODEL = "mlp"  # the model's name on every server (Strata: the endpoint)
PATH = "/inference.GRPCInferenceService/ModelInfer"
CELLS = {  # name: (batch, connections, streams per connection)
    "a": (1, 1, 8),
    "b": (1, 4, 8),
    "c": (32, 1, 8),
    "d": (1, 1, 1),
}
WARMUP_SECONDS = 1
TOLERANCE = 1e-5


# ---------------------------------------------------------------------------- the model

def build_model(path: Path) -> None:
    """StandardScaler + MLPClassifier(128, 64) on 32 float inputs, trained on a fixed synthetic
    set, exported with skl2onnx (input `input` [N, 32] FP32; outputs `label`, `probabilities`)."""
    import warnings

    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import make_classification
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = make_classification(n_samples=4000, n_features=32, n_informative=16, random_state=0)
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=60, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x.astype("float32"), y)
    onx = to_onnx(pipe, initial_types=[("input", FloatTensorType([None, 32]))],
                  options={id(pipe.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())


def reference(model_path: Path, batch: int) -> tuple:
    """(labels, probabilities) of onnxruntime in this process, one intra-op thread, for the input
    tests.bench.inference_load.frame_model_infer puts in the request."""
    import numpy as np
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 32)).astype(np.float32)
    labels, probs = sess.run(["label", "probabilities"], {"input": x})
    return labels, probs


# ---------------------------------------------------------------------------- the peers' venvs

def peer_venv(name: str) -> Path:
    """The peer's virtualenv, created and installed once (cached by its pins)."""
    pins = PEER_PACKAGES[name]
    venv = PEERS_DIR / name
    marker = venv / "bench-pins.txt"
    if marker.exists() and marker.read_text().splitlines()[:len(pins)] == pins:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"installing {' '.join(pins)} into {venv.relative_to(ROOT)} (once) ...", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "--disable-pip-version-check", *pins], check=True)
    freeze = subprocess.run([*pip, "freeze"], check=True, capture_output=True, text=True).stdout
    marker.write_text("\n".join(pins) + "\n# pip freeze:\n" + freeze)
    return venv


# ---------------------------------------------------------------------------- servers

@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen  # the serving process tree's root
    log: Path
    config: str
    extra: list[subprocess.Popen] = field(default_factory=list)  # started with it, not measured (registry)
    home: Path | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}{PATH}"

    def cpu_seconds(self) -> float:
        from tests.bench.inference_load import cpu_seconds
        return cpu_seconds(process_tree(self.proc.pid))

    def cpu_by_process(self) -> dict[int, float]:
        """CPU seconds so far of each process of the tree (the root first)."""
        from tests.bench.inference_load import cpu_seconds
        return {pid: cpu_seconds([pid]) for pid in process_tree(self.proc.pid)}

    def idle_cpu(self, seconds: float = 2) -> dict:
        """CPU the server spends with no requests (pollers, heartbeats, metrics): ms per second."""
        a = self.cpu_by_process()
        time.sleep(seconds)
        b = self.cpu_by_process()
        root = (b.get(self.proc.pid, 0) - a.get(self.proc.pid, 0)) / seconds * 1000
        rest = sum(b[p] - a.get(p, 0) for p in b if p != self.proc.pid) / seconds * 1000
        return {"root_ms_per_s": round(root, 1), "children_ms_per_s": round(rest, 1)}

    def stop(self) -> None:
        for p in (self.proc, *reversed(self.extra)):
            stop_process(p)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants now (from /proc/*/stat's ppid)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def wait_v2_ready(server: Server, timeout: float = 120) -> None:
    """V2 ServerReady, then ModelReady for the model, over gRPC."""
    import grpc
    from strata.kserve.v2 import grpc_service_pb2 as v2
    from strata.kserve.v2 import grpc_service_pb2_grpc as v2_grpc
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(server.addr) as ch:
        stub = v2_grpc.GRPCInferenceServiceStub(ch)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise SystemExit(f"{server.name} exited during start-up:\n{server.log.read_text()[-4000:]}")
            try:
                if (stub.ServerReady(v2.ServerReadyRequest(), timeout=2).ready
                        and stub.ModelReady(v2.ModelReadyRequest(name=MODEL), timeout=2).ready):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"{server.name} not ready after {timeout} s:\n{server.log.read_text()[-4000:]}")


def start_strata(work: Path, model_path: Path) -> Server:
    """Registry + inference service, defaults except auth off; endpoint `mlp` (batching max 64)."""
    import grpc
    from services.clients.registry import RegistryClient
    from strata.inference.v1 import inference_pb2 as pb
    from strata.inference.v1 import inference_pb2_grpc

    env = {"STRATA_AUTH": "disabled", "STRATA_LOG_LEVEL": "WARNING"}
    reg_port, port = free_port(), free_port()
    registry = start_service("registry", work / "registry", reg_port, env)
    try:
        with RegistryClient(f"127.0.0.1:{reg_port}") as reg:
            reg.register_onnx("bench-sklearn-mlp", model_path, create_model=True)
        home = work / "strata"
        proc = start_service("inference", home, port, {
            **env, "STRATA_REGISTRY_ADDR": f"127.0.0.1:{reg_port}", "STRATA_INFERENCE_INTRA_OP_THREADS": "1"})
    except BaseException:
        stop_process(registry)
        raise
    server = Server("strata", port, proc, home / "inference.log", extra=[registry], home=home,
                    config=(f"{os.cpu_count()} serving processes (one per core, pinned), 1 intra-op thread, "
                            "dynamic batching max 64 (no queue delay), prediction log on (local files), auth off"))
    try:
        with grpc.insecure_channel(server.addr) as ch:
            inference_pb2_grpc.InferenceServiceStub(ch).CreateEndpoint(pb.CreateEndpointRequest(
                endpoint=pb.Endpoint(name=MODEL, policy=pb.TrafficPolicy(
                    targets=[pb.Target(model="bench-sklearn-mlp", version=1, weight=1)],
                    batching=pb.BatchingConfig(max_batch_size=64)))))
        wait_v2_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def start_kserve(work: Path, model_path: Path) -> Server:
    venv = peer_venv("kserve")
    port = free_port()
    log = work / "kserve.log"
    cmd = [str(venv / "bin" / "python"), str(SCRIPTS / "kserve_server.py"), "--model_path", str(model_path),
           "--model_name", MODEL, "--grpc_port", str(port), "--http_port", str(free_port()),
           "--enable_latency_logging", "false"]
    env = {**os.environ, "KSERVE_LOGLEVEL": "WARNING"}
    env.pop("PYTHONPATH", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server("kserve", port, proc, log, config=(
        "kserve.ModelServer, one process (its gRPC server is one grpc.aio server in the main process; "
        "--workers only multiplies REST), workers=1, predict a plain function on the event loop, "
        "KSERVE_LOGLEVEL=WARNING, --enable_latency_logging false, raw outputs"))
    try:
        wait_v2_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def start_mlserver(work: Path, model_path: Path, workers: int) -> Server:
    venv = peer_venv("mlserver")
    port = free_port()
    root = work / "mlserver"
    model_dir = root / MODEL
    model_dir.mkdir(parents=True)
    shutil.copy(model_path, model_dir / "model.onnx")
    shutil.copy(SCRIPTS / "mlserver_runtime.py", root / "mlserver_runtime.py")
    shutil.copy(SCRIPTS / "mlserver-model-settings.json", model_dir / "model-settings.json")
    settings = json.loads((SCRIPTS / "mlserver-settings.json").read_text())
    settings.update(grpc_port=port, http_port=free_port(), metrics_port=free_port(), parallel_workers=workers)
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    log = work / "mlserver.log"
    env = {**os.environ, "PYTHONPATH": str(root)}  # the runtime module, for the parallel workers too
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(venv / "bin" / "mlserver"), "start", str(root)], cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Server("mlserver", port, proc, log, config=(
        f"mlserver start, parallel_workers={workers}, debug false, adaptive batching off (default), "
        "metrics on (default), custom MLModel runtime"))
    try:
        wait_v2_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------------------- checks

def probe(server: Server, body: Path, expected: tuple) -> int:
    """Post the exact bytes h2load sends with curl: grpc-status 0, and the same labels and
    probabilities (within TOLERANCE) as onnxruntime in process. Returns the reply's size (the
    gRPC-framed message, the DATA bytes h2load counts per request)."""
    import numpy as np
    from strata.kserve.v2 import grpc_service_pb2 as v2
    reply = body.with_suffix(f".{server.name}.reply")
    err = subprocess.run(["curl", "-sS", "-v", "--http2-prior-knowledge", "-H", "content-type: application/grpc",
                          "-H", "te: trailers", "--data-binary", f"@{body}", "-o", str(reply), server.url],
                         capture_output=True, text=True).stderr
    if not re.search(r"grpc-status: 0\b", err):
        raise SystemExit(f"{server.name}: the pre-framed request did not get grpc-status 0:\n{err[-3000:]}")
    data = reply.read_bytes()
    flag, size = data[0], struct.unpack(">I", data[1:5])[0]
    if flag != 0 or len(data) != 5 + size:
        raise SystemExit(f"{server.name}: not one uncompressed gRPC message ({len(data)} bytes, flag {flag})")
    resp = v2.ModelInferResponse.FromString(data[5:])
    got = {}
    for i, out in enumerate(resp.outputs):
        dtype = {"FP32": np.float32, "INT64": np.int64, "FP64": np.float64}[out.datatype]
        if resp.raw_output_contents:
            arr = np.frombuffer(resp.raw_output_contents[i], dtype=dtype)
        else:
            arr = np.array(out.contents.fp32_contents if out.datatype == "FP32" else
                           out.contents.int64_contents if out.datatype == "INT64" else out.contents.fp64_contents, dtype)
        got[out.name] = arr
    labels, probs = expected
    if "probabilities" not in got or "label" not in got:
        raise SystemExit(f"{server.name}: reply lacks label or probabilities: {sorted(got)}")
    p = got["probabilities"].reshape(probs.shape)
    diff = float(np.max(np.abs(p - probs)))
    if diff > TOLERANCE or not np.array_equal(got["label"].ravel(), labels.ravel()):
        raise SystemExit(f"{server.name}: wrong answer (max |dp| {diff:.2e}, labels {got['label'].ravel()[:8]} "
                         f"against {labels.ravel()[:8]})")
    return len(data)


def prediction_records(home: Path) -> int:
    from services.inference.predlog import read_frames
    return sum(len(read_frames(f)) for f in (home / "inference" / "predictions").glob("*.binpb"))


# ---------------------------------------------------------------------------- measuring

def h2load_run(server: Server, body: Path, *, connections: int, streams: int, seconds: int, log: Path) -> tuple:
    from tests.bench.inference_load import connections_per_process, h2load_command
    cmd = h2load_command(server.url, body, None, connections=connections, streams=streams, seconds=seconds,
                         log=log, warmup=0)
    log.unlink(missing_ok=True)
    cpu0 = server.cpu_by_process()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(min(seconds / 2, 2))
    split = connections_per_process(server.port)
    out, err = proc.communicate()
    cpu1 = server.cpu_by_process()
    if proc.returncode:
        raise RuntimeError(f"h2load failed against {server.name}: {err or out}")
    # per process: the tree's root (Strata's supervisor, KServe's only process, MLServer's
    # gRPC front) and its descendants (Strata's serving processes, MLServer's workers)
    root = cpu1.get(server.proc.pid, 0) - cpu0.get(server.proc.pid, 0)
    children = sum(cpu1[p] - cpu0.get(p, 0) for p in cpu1 if p != server.proc.pid)
    return out, (root, children), split


def counts(out: str) -> dict:
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    data = re.search(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?\((\d+)\) data", out)
    if not m or not data:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    total, started, done, ok, failed, errored, timeout = map(int, m.groups())
    return {"started": started, "done": done, "succeeded": ok, "failed": failed, "errored": errored,
            "timeout": timeout, "data_bytes": int(data.group(3))}


def run_cell(server: Server, cell: str, body: Path, reply_size: int, seconds: int, work: Path) -> dict:
    from tests.bench.inference_load import parse_h2load
    batch, conns, streams = CELLS[cell]
    log = work / "h2load.log"
    wout, _, _ = h2load_run(server, body, connections=conns, streams=streams, seconds=WARMUP_SECONDS, log=log)
    warm = counts(wout)
    out, (cpu_root, cpu_children), split = h2load_run(server, body, connections=conns, streams=streams,
                                                      seconds=seconds, log=log)
    cpu = cpu_root + cpu_children
    c = counts(out)
    res = parse_h2load(out, log, batch)
    # Replies that are not the full message (a gRPC error carries none): by the DATA bytes.
    full = c["data_bytes"] // reply_size
    bad_replies = max(0, c["succeeded"] - full)
    completed = c["succeeded"] + c["failed"]
    return {"server": server.name, "cell": cell, "batch": batch, "connections": conns, "streams": streams,
            "rps": res["rps"], "rows_per_s": res["rows_per_s"], "p50_ms": res["p50_ms"], "p95_ms": res["p95_ms"],
            "p99_ms": res["p99_ms"], "errors": c["failed"] + bad_replies, "h2load": c,
            "reply_bytes": reply_size, "data_bytes_per_reply": round(c["data_bytes"] / c["succeeded"], 2)
            if c["succeeded"] else None, "connections_per_process": split,
            "server_cpu_s": round(cpu, 3),
            "cpu_us_per_request": round(cpu / completed * 1e6, 1) if completed else None,
            "cpu_us_per_request_root": round(cpu_root / completed * 1e6, 1) if completed else None,
            "cpu_us_per_request_children": round(cpu_children / completed * 1e6, 1) if completed else None,
            "warmup": warm}


def check_prediction_log(server: Server, expected_min: int, slack: int, timeout: float = 15) -> dict:
    """Wait for the log's writer (every 20 ms) and count; abort if records are missing."""
    deadline = time.monotonic() + timeout
    last, stable_since = -1, time.monotonic()
    while True:
        n = prediction_records(server.home)
        if n != last:
            last, stable_since = n, time.monotonic()
        if n >= expected_min and time.monotonic() - stable_since > 0.5:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    ok = expected_min <= last <= expected_min + slack
    return {"records": last, "expected_min": expected_min, "allowed_extra": slack, "ok": ok}


# ---------------------------------------------------------------------------- output

COLS = ("rps", "rows_per_s", "p50_ms", "p99_ms", "errors", "cpu_us_per_request")


def print_round(rnd: int, rows: list[dict]) -> None:
    print(f"\nround {rnd + 1}: order {' -> '.join(dict.fromkeys(r['server'] for r in rows))}")
    print(f"{'cell':<28}{'server':<10}{'req/s':>10}{'rows/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
          f"{'CPU us/req':>12}{'(root+children)':>18}{'split':>8}")
    for cell in CELLS:
        for r in (r for r in rows if r["cell"] == cell):
            label = f"{cell}: b{r['batch']} {r['connections']}x{r['streams']}"
            split = ":".join(map(str, r["connections_per_process"])) or "-"
            print(f"{label:<28}{r['server']:<10}{r['rps']:>10,.1f}{r['rows_per_s']:>11,.1f}{r['p50_ms']:>9.3f}"
                  f"{r['p99_ms']:>9.3f}{r['errors']:>8}{r['cpu_us_per_request'] or float('nan'):>12.1f}"
                  f"{'%.0f+%.0f' % (r['cpu_us_per_request_root'] or 0, r['cpu_us_per_request_children'] or 0):>18}"
                  f"{split:>8}")


def ratios(rounds: list[list[dict]], peers: list[str]) -> list[dict]:
    out = []
    for i, rows in enumerate(rounds):
        by = {(r["server"], r["cell"]): r for r in rows}
        for cell in dict.fromkeys(r["cell"] for r in rows):
            s = by.get(("strata", cell))
            for peer in peers:
                p = by.get((peer, cell))
                if not s or not p:
                    continue
                out.append({"round": i + 1, "cell": cell, "peer": peer,
                            "rps": round(s["rps"] / p["rps"], 2) if p["rps"] else None,
                            "p50": round(s["p50_ms"] / p["p50_ms"], 2), "p99": round(s["p99_ms"] / p["p99_ms"], 2),
                            "cpu_per_request": round(s["cpu_us_per_request"] / p["cpu_us_per_request"], 2)
                            if s["cpu_us_per_request"] and p["cpu_us_per_request"] else None})
    return out


def print_ratios(rows: list[dict]) -> None:
    print("\nStrata / peer, per cell and round (req/s: > 1 Strata faster; p50, p99, CPU per request: < 1 Strata lower)")
    print(f"{'cell':<6}{'peer':<10}{'round':>6}{'req/s':>8}{'p50':>8}{'p99':>8}{'CPU/req':>9}")
    for r in sorted(rows, key=lambda r: (r["cell"], r["peer"], r["round"])):
        cpu = f"{r['cpu_per_request']:.2f}" if r["cpu_per_request"] else "-"
        print(f"{r['cell']:<6}{r['peer']:<10}{r['round']:>6}{r['rps']:>8.2f}{r['p50']:>8.2f}{r['p99']:>8.2f}{cpu:>9}")


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--seconds", type=int, default=8, help="measured seconds per cell (after a 1 s warm-up)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cells", default="a,b,c,d", help="of " + ", ".join(
        f"{k}: b{b} {c}x{s}" for k, (b, c, s) in CELLS.items()))
    ap.add_argument("--peers", default="kserve,mlserver")
    ap.add_argument("--mlserver-workers", type=int, default=0,
                    help="MLServer parallel_workers (0, inference in the gRPC process, was the best of 0/1/2 here)")
    ap.add_argument("--no-strata", action="store_true", help="peers only (to tune their settings)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cells = [c for c in args.cells.split(",") if c]
    peers = [p for p in args.peers.split(",") if p]
    if unknown := [c for c in cells if c not in CELLS] + [p for p in peers if p not in PEER_PACKAGES]:
        ap.error(f"unknown cell or peer: {unknown}")
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    for p in peers:
        peer_venv(p)
    from tests.bench.inference_load import frame_model_infer

    work = Path(tempfile.mkdtemp(prefix="strata-peers-"))
    servers: list[Server] = []
    results: dict = {"cpu_count": os.cpu_count(), "seconds": args.seconds, "rounds": [], "cells": {
        c: dict(zip(("batch", "connections", "streams"), CELLS[c], strict=True)) for c in cells},
        "versions": PEER_PACKAGES}
    try:
        model_path = work / "model.onnx"
        build_model(model_path)
        bodies = {}
        for batch in sorted({CELLS[c][0] for c in cells}):
            bodies[batch] = work / f"request-b{batch}.bin"
            bodies[batch].write_bytes(frame_model_infer(MODEL, batch))
        if not args.no_strata:
            servers.append(start_strata(work, model_path))
        starters = {"kserve": lambda: start_kserve(work, model_path),
                    "mlserver": lambda: start_mlserver(work, model_path, args.mlserver_workers)}
        for p in peers:
            servers.append(starters[p]())
        results["configs"] = {s.name: s.config for s in servers}
        for s in servers:
            print(f"{s.name}: {s.config}", flush=True)
        time.sleep(2)  # past start-up
        results["idle_cpu"] = {s.name: s.idle_cpu() for s in servers}
        print("idle CPU, ms per second (process tree root / descendants): " + ", ".join(
            f"{k} {v['root_ms_per_s']} / {v['children_ms_per_s']}" for k, v in results["idle_cpu"].items()), flush=True)

        # Correctness: the same answer as onnxruntime here, from every server, before measuring.
        reply_size: dict[tuple[str, int], int] = {}
        for batch, body in bodies.items():
            expected = reference(model_path, batch)
            for s in servers:
                reply_size[(s.name, batch)] = probe(s, body, expected)
        print(f"correctness: every server answered batch {sorted(bodies)} like onnxruntime in process "
              f"(labels equal, probabilities within {TOLERANCE})", flush=True)
        probes = len(bodies)  # curl requests each server scored

        strata = next((s for s in servers if s.name == "strata"), None)
        logged_min, logged_slack = probes, 0
        for rnd in range(args.rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            rows = []
            for s in order:
                for cell in cells:
                    batch = CELLS[cell][0]
                    r = run_cell(s, cell, bodies[batch], reply_size[(s.name, batch)], args.seconds, work)
                    rows.append(r)
                    print(f"  round {rnd + 1} {s.name} {cell}: {r['rps']:,.1f} req/s, p50 {r['p50_ms']} ms, "
                          f"p99 {r['p99_ms']} ms, errors {r['errors']}, {r['cpu_us_per_request']} CPU us/req",
                          flush=True)
                    if s is strata:
                        for c in (r["h2load"], r["warmup"]):
                            logged_min += c["succeeded"]
                            # in flight when the run ended: scored and logged, never answered to h2load
                            logged_slack += c["started"] - c["done"] + r["connections"] * r["streams"]
                if s is strata:
                    check = check_prediction_log(s, logged_min, logged_slack)
                    check["round"] = rnd + 1
                    results.setdefault("prediction_log", []).append(check)
                    print(f"  prediction log after round {rnd + 1}: {check['records']} records; h2load saw "
                          f"{logged_min - probes} succeed (warm-ups included) + {probes} probes = {logged_min}; "
                          f"allowed extra (in flight at the ends of runs) {logged_slack}: "
                          f"{'OK' if check['ok'] else 'MISMATCH'}", flush=True)
                    if not check["ok"]:
                        raise SystemExit("the prediction log does not hold every prediction")
            results["rounds"].append(rows)
            print_round(rnd, rows)
        results["ratios"] = ratios(results["rounds"], [p for p in peers if strata])
        if strata:
            print_ratios(results["ratios"])
    finally:
        for s in servers:
            s.stop()
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
