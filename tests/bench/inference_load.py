"""Load benchmark of the inference service, against real processes on this machine.

    .venv/bin/python -m tests.bench.inference_load [--seconds 8] [--quick] [--json out.json]

Starts a registry and the inference service (one serving process per core, JWT auth on,
prediction logging on), registers a tabular MLP (32 float inputs -> 256 -> 256 -> 2, built here
with random weights), deploys it behind two endpoints (dynamic batching on, and off for the
comparison), then measures:

1. h2load (C, from Debian's nghttp2-client) posting a pre-framed V2 ModelInfer request with
   `content-type: application/grpc` and `te: trailers` -- the headline figures, because a C
   client leaves the two cores to the server. One request is checked for grpc-status 0 first.
2. Closed-loop Python clients: the stock tritonclient.grpc.aio (V2 ModelInfer) and the
   platform's own Predict, at concurrency 1, 8, 32 and batch 1 and 32.

Latency percentiles of h2load come from its per-request log (--log-file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from services.common.auth import mint_token
from tests.inference.models import mlp
from tests.processes import ROOT, free_port, start_service, stop_process

SECRET = "bench-secret-0123456789abcdef0123"
PATH = "/inference.GRPCInferenceService/ModelInfer"


def frame_model_infer(model: str, batch: int) -> bytes:
    """A gRPC frame (flag, length, message) of a ModelInfer request with raw_input_contents."""
    code = ("import sys,struct,numpy as np\n"
            "from strata.kserve.v2 import grpc_service_pb2 as v2\n"
            f"r=v2.ModelInferRequest(model_name={model!r})\n"
            f"t=r.inputs.add(name='input',datatype='FP32',shape=[{batch},32])\n"
            f"r.raw_input_contents.append(np.random.default_rng(0).standard_normal(({batch},32)).astype(np.float32).tobytes())\n"
            "d=r.SerializeToString();sys.stdout.buffer.write(b'\\x00'+struct.pack('>I',len(d))+d)\n")
    # A separate interpreter: the generated V2 module must not meet tritonclient's in one process.
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT).stdout


def h2load_command(url: str, body: Path, token: str | None, *, connections: int, streams: int, seconds: int,
                   log: Path, content_type: str = "application/grpc", warmup: float = 2) -> list[str]:
    """h2load posting `body` to `url` for `seconds` (after `warmup` seconds not counted), one
    thread, with a per-request log; `token` None sends no authorization header."""
    grpc_headers = ["-H", "te: trailers"] if content_type == "application/grpc" else []
    auth = ["-H", f"authorization: Bearer {token}"] if token is not None else []
    warm = ["--warm-up-time", f"{warmup:g}"] if warmup else []
    return ["h2load", "-D", str(seconds), *warm, "-c", str(connections), "-m", str(streams),
            "-t", "1", "-H", f"content-type: {content_type}", *grpc_headers, *auth,
            "-d", str(body), "--log-file", str(log), url]


def parse_h2load(out: str, log: Path, rows: int) -> dict:
    """Throughput, status counts and latency percentiles (from the per-request log) of a run."""
    m = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    status = re.search(r"status codes: (\d+) 2xx", out)
    failed = re.search(r"requests: .*?(\d+) failed", out)
    lat = np.array([int(line.split()[2]) for line in log.read_text().splitlines() if line.strip()]) / 1000
    rps = float(m.group(2)) if m else 0.0
    return {"rps": round(rps, 1), "rows_per_s": round(rps * rows, 1), "ok_2xx": int(status.group(1)) if status else 0,
            "failed": int(failed.group(1)) if failed else -1,
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p95_ms": round(float(np.percentile(lat, 95)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3)}


def h2load(url: str, body: Path, token: str, *, connections: int, streams: int, seconds: int,
           workdir: Path, rows: int, content_type: str = "application/grpc") -> dict:
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    cmd = h2load_command(url, body, token, connections=connections, streams=streams, seconds=seconds, log=log,
                         content_type=content_type)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = int(url.split(":")[2].split("/")[0])
    time.sleep(2.2)  # past the warm-up
    pids = serving_pids(port)
    cpu0 = cpu_seconds(pids)
    time.sleep(seconds / 2)
    split = connections_per_process(port)
    out, err = proc.communicate()
    cpu = cpu_seconds(pids) - cpu0
    if proc.returncode:
        raise RuntimeError(f"h2load failed: {err}")
    parsed = parse_h2load(out, log, rows)
    rps = parsed["rps"]
    return {"connections": connections, "streams_per_connection": streams, **parsed,
            "connections_per_process": split,
            # CPU of the serving processes (all their threads) per request: steadier than the
            # throughput on a shared machine, and what a change to the server really saves.
            "server_cpu_us_per_request": round(cpu / (rps * (seconds - 0.2)) * 1e6, 1) if rps else None}


def serving_pids(port: int) -> list[int]:
    """The processes that hold connections to `port` (the serving processes under load)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", out)})


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of `pids` so far (every thread), from /proc/PID/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def connections_per_process(port: int) -> list[int]:
    """How the kernel spread the client's connections over the serving processes (ss -p)."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True).stdout
    pids = re.findall(r"pid=(\d+)", out)
    return sorted((pids.count(p) for p in set(pids)), reverse=True)


def rest_via_envoy(work: Path, reg_port: int, inf_port: int, token: str, seconds: int) -> dict:
    """Predict as REST/JSON through the real Envoy gateway (JWT checked at the edge and in the
    service), rows in JSON, at 8 concurrent streams, batch 1 and batch 32."""
    from gateway.config import render_envoy_config
    from gateway.envoy import start_envoy, wait_ready, write_config
    gw_port, admin_port = free_port(), free_port()
    config = render_envoy_config(
        upstreams={"registry": f"127.0.0.1:{reg_port}", "inference": f"127.0.0.1:{inf_port}"},
        descriptor_path=ROOT / "gateway" / "strata.pb", jwt_secret=SECRET, listen_host="127.0.0.1",
        listen_port=gw_port, admin_port=admin_port, rate_limit_per_second=1_000_000)
    envoy = start_envoy(write_config(config, work / "gateway"), work / "envoy.log")
    out = {}
    try:
        wait_ready(admin_port, 20, process=envoy)
        x = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
        url = f"http://127.0.0.1:{gw_port}/v1/endpoints/bench:predict"
        for rows in (1, 32):
            body = work / f"rest-{rows}.json"
            body.write_text(json.dumps({"rows": [{"input": r.tolist()} for r in x[:rows]]}))
            probe = subprocess.run(["curl", "-sS", "-H", f"authorization: Bearer {token}", "--data-binary",
                                    f"@{body}", url], capture_output=True, text=True, check=True).stdout
            if '"rows"' not in probe:
                raise SystemExit(f"REST predict through Envoy failed: {probe[:500]}")
            for conns, streams in ((1, 1), (1, 8)):
                key = f"rest batch={rows} c={conns}x{streams}"
                out[key] = h2load(url, body, token, connections=conns, streams=streams, seconds=seconds,
                                  workdir=work, rows=rows, content_type="application/json")
                print(key, out[key], flush=True)
    finally:
        stop_process(envoy)
    return out


def check_grpc_ok(url: str, body: Path, token: str) -> None:
    """The exact bytes h2load sends get grpc-status 0 (h2load itself does not read trailers;
    curl prints them)."""
    out = subprocess.run(["curl", "-sS", "-v", "--http2-prior-knowledge", "-H", "content-type: application/grpc",
                          "-H", "te: trailers", "-H", f"authorization: Bearer {token}", "--data-binary", f"@{body}",
                          "-o", os.devnull, url], capture_output=True, text=True).stderr
    if not re.search(r"grpc-status: 0\b", out):
        raise SystemExit(f"the pre-framed request did not get grpc-status 0:\n{out[-3000:]}")


def loadgen(kind: str, addr: str, target: str, batch: int, concurrency: int, seconds: float, token: str) -> dict:
    env = {**os.environ, "BENCH_TOKEN": token}
    out = subprocess.run([sys.executable, "-m", "tests.bench.loadgen", kind, addr, target, str(batch),
                          str(concurrency), str(seconds)], check=True, capture_output=True, text=True, cwd=ROOT,
                         env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="h2load only")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", default="", help="run the h2load scenarios whose name contains this")
    ap.add_argument("--workers", type=int, default=0, help="serving processes (default: the service's)")
    ap.add_argument("--no-prediction-log", action="store_true", help="for comparison only")
    args = ap.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    work = Path(tempfile.mkdtemp(prefix="strata-bench-"))
    token = mint_token(SECRET, "bench", ["viewer", "developer"])
    auth = {"STRATA_JWT_SECRET": SECRET, "STRATA_LOG_LEVEL": "WARNING"}
    procs = []
    results: dict[str, object] = {"cpu_count": os.cpu_count()}
    try:
        reg_port, inf_port = free_port(), free_port()
        procs.append(start_service("registry", work / "registry", reg_port, auth))
        model_path = work / "mlp.onnx"
        model_path.write_bytes(mlp((32, 256, 256, 2)))
        from services.clients.registry import RegistryClient
        heavy_path = work / "heavy.onnx"
        heavy_path.write_bytes(mlp((32, 1024, 1024, 1024, 2)))  # compute-bound: batching pays off
        with RegistryClient(f"127.0.0.1:{reg_port}", token) as reg:
            reg.register_onnx("bench-mlp", model_path, create_model=True)
            reg.register_onnx("bench-heavy", heavy_path, create_model=True)
        extra = {"STRATA_INFERENCE_WORKERS": str(args.workers)} if args.workers else {}
        if args.no_prediction_log:
            extra["STRATA_INFERENCE_PREDICTION_LOG"] = "disabled"
        procs.append(start_service("inference", work / "inference", inf_port, {
            **auth, **extra, "STRATA_REGISTRY_ADDR": f"127.0.0.1:{reg_port}"}))
        addr = f"127.0.0.1:{inf_port}"
        import grpc
        from strata.inference.v1 import inference_pb2 as pb
        from strata.inference.v1 import inference_pb2_grpc
        md = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(addr) as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            for name, model, batching in (
                    ("bench", "bench-mlp", pb.BatchingConfig(max_batch_size=64)),
                    ("bench-nobatch", "bench-mlp", pb.BatchingConfig(max_batch_size=1)),
                    ("bench-delay", "bench-mlp", pb.BatchingConfig(max_batch_size=64, max_queue_delay_us=300)),
                    ("heavy", "bench-heavy", pb.BatchingConfig(max_batch_size=64)),
                    ("heavy-nobatch", "bench-heavy", pb.BatchingConfig(max_batch_size=1))):
                stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(name=name, policy=pb.TrafficPolicy(
                    targets=[pb.Target(model=model, version=1, weight=1)], batching=batching))), metadata=md)
        url = f"http://{addr}{PATH}"
        h2 = {}
        scenarios = [(rows, ep) for rows in (1, 32) for ep in ("bench", "bench-nobatch")]
        scenarios += [(1, "bench-delay"), (1, "heavy"), (1, "heavy-nobatch")]
        for rows, ep in scenarios:
            body = work / f"{ep}-{rows}.bin"
            body.write_bytes(frame_model_infer(ep, rows))
            check_grpc_ok(url, body, token)
            for conns, streams in ((1, 1), (1, 8), (8, 1), (4, 8)):
                key = f"{ep} batch={rows} c={conns}x{streams}"
                if args.only not in key:
                    continue
                h2[key] = h2load(url, body, token, connections=conns, streams=streams, seconds=args.seconds,
                                 workdir=work, rows=rows)
                print(key, h2[key], flush=True)
        results["h2load"] = h2
        if not args.only or "rest" in args.only:
            results["rest_via_envoy"] = rest_via_envoy(work, reg_port, inf_port, token, args.seconds)
        if not args.quick:
            py = {}
            for kind, target in (("triton", "bench"), ("predict", "bench")):
                for rows in (1, 32):
                    for conc in (1, 8, 32):
                        key = f"{kind} batch={rows} concurrency={conc}"
                        py[key] = loadgen(kind, addr, target, rows, conc, args.seconds / 2, token)
                        print(key, py[key], flush=True)
            results["python_clients"] = py
    finally:
        for p in reversed(procs):
            stop_process(p)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
