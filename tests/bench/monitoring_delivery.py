"""No-loss benchmark of the prediction log's delivery to monitoring: the inference service driven
near its peak with monitoring on, monitoring killed with -9 and started again in the middle.

    .venv/bin/python -m tests.bench.monitoring_delivery [--seconds 60] [--kill-at 30]

Real processes on this machine (STRATA_HOME in a temporary directory, SQLite, local store, auth
off): a registry, the monitoring service and the inference service (two serving processes, its
prediction log sent to monitoring). A classifier with four [rows, 1] inputs serves behind an
endpoint; h2load (C) posts one pre-framed V2 ModelInfer of one row, 4 connections x 8 streams, for
--seconds. At --kill-at seconds monitoring is killed with SIGKILL and started again at once (the
inference service spools what it cannot deliver and replays it, every 5 s).

Afterwards, once the counts stop moving: predictions answered = the inference service's own count
of the endpoint's successful predictions (strata_inference_predictions_total{outcome="ok"}, every
serving process, read from its metrics port: the requests it scored, h2load's and the probe's,
including those in flight when h2load stopped), rows logged = the rows monitoring holds for the
endpoint (GetPerformance). Nothing lost and nothing stored twice means the two are equal; the run
fails otherwise. Also printed: h2load's figures, the prediction log's counters (delivered,
spooled, rejected, dropped) and how long monitoring took to catch up after the load stopped.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import requests
from strata.inference.v1 import inference_pb2 as ipb
from strata.inference.v1 import inference_pb2_grpc
from strata.monitoring.v1 import monitoring_pb2 as mpb
from strata.monitoring.v1 import monitoring_pb2_grpc

from services.clients.registry import RegistryClient
from tests.bench.inference_load import cpu_seconds, h2load_command, parse_h2load, serving_pids
from tests.monitoring.conftest import FEATURES, classifier_onnx
from tests.processes import ROOT, free_port, start_service, stop_process

MODEL, ENDPOINT = "delivery-bench", "delivery-bench"
PATH = "/inference.GRPCInferenceService/ModelInfer"


def frame() -> bytes:
    """A gRPC frame of a V2 ModelInfer of one row: each feature a [1, 1] FP32 input."""
    code = ("import sys,struct,numpy as np\n"
            "from strata.kserve.v2 import grpc_service_pb2 as v2\n"
            f"r=v2.ModelInferRequest(model_name={ENDPOINT!r})\n"
            f"for i,f in enumerate({FEATURES!r}):\n"
            "    r.inputs.add(name=f,datatype='FP32',shape=[1,1])\n"
            "    r.raw_input_contents.append(np.array([[0.5*i-0.7]],np.float32).tobytes())\n"
            "d=r.SerializeToString();sys.stdout.buffer.write(b'\\x00'+struct.pack('>I',len(d))+d)\n")
    # A separate interpreter, as tests/bench/inference_load.py does (generated V2 modules clash).
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT).stdout


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels on a /metrics page."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def logged(monitoring: str) -> int:
    stub = monitoring_pb2_grpc.MonitoringServiceStub(grpc.insecure_channel(monitoring))
    try:
        got = stub.GetPerformance(mpb.GetPerformanceRequest(endpoint=ENDPOINT), timeout=60)
    except grpc.RpcError as e:
        if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return 0
        raise
    return sum(v.rows for v in got.versions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--kill-at", type=float, default=30)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--home", type=Path, help="keep the services' homes (logs, spool) here")
    ap.add_argument("--baseline", action="store_true", help="the same load with the prediction log written to "
                                                            "local files (no monitoring, no kill): the cost of delivery")
    args = ap.parse_args()
    if args.home:
        args.home.mkdir(parents=True, exist_ok=True)
        run(args.home, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args)


def run(home: Path, args: argparse.Namespace) -> None:
    rp, mp, ip, im = free_port(), free_port(), free_port(), free_port()
    base = {"STRATA_AUTH": "disabled", "STRATA_REGISTRY_ADDR": f"127.0.0.1:{rp}"}
    procs = {"registry": start_service("registry", home / "registry", rp, base)}
    mon_env = {**base, "STRATA_MONITORING_METRICS_URLS": "none"}
    try:
        procs["monitoring"] = start_service("monitoring", home / "monitoring", mp, mon_env)
        sink = {} if args.baseline else {"STRATA_INFERENCE_MONITORING": f"127.0.0.1:{mp}"}
        procs["inference"] = start_service("inference", home / "inference", ip, {
            **base, "STRATA_INFERENCE_METRICS_PORT": str(im), **sink})
        model = home / "clf.onnx"
        model.write_bytes(classifier_onnx())
        with RegistryClient(f"127.0.0.1:{rp}") as client:
            client.register_onnx(MODEL, model, create_model=True)
        with grpc.insecure_channel(f"127.0.0.1:{ip}") as ch:
            inference_pb2_grpc.InferenceServiceStub(ch).CreateEndpoint(ipb.CreateEndpointRequest(endpoint=ipb.Endpoint(
                name=ENDPOINT, policy=ipb.TrafficPolicy(targets=[ipb.Target(model=MODEL, version=1, weight=1)]))))
        body = home / "infer.bin"
        body.write_bytes(frame())
        log = home / "h2load.log"
        cmd = h2load_command(f"http://127.0.0.1:{ip}{PATH}", body, None, connections=args.connections,
                             streams=args.streams, seconds=args.seconds, log=log, warmup=0)
        print(f"h2load {args.connections}x{args.streams} for {args.seconds} s; monitoring killed -9 at "
              f"{args.kill_at:g} s", flush=True)
        load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        workers = serving_pids(ip)
        cpu0 = cpu_seconds(workers), cpu_seconds([procs["monitoring"].pid])
        if args.baseline:
            h2 = parse_h2load(load.communicate(timeout=args.seconds + 60)[0], log, 1)
            print(f"baseline (prediction log to local files): {h2['rps']:,.0f} requests/s, p50 {h2['p50_ms']} ms, "
                  f"p99 {h2['p99_ms']} ms, failed {h2['failed']}; inference CPU "
                  f"{(cpu_seconds(workers) - cpu0[0]) / (args.seconds - 1):.2f} cores")
            return
        if args.kill_at < args.seconds:  # (--kill-at past the load: delivery without a kill)
            time.sleep(max(0.0, args.kill_at - 1))
            before = logged(f"127.0.0.1:{mp}")
            procs["monitoring"].kill()
            procs["monitoring"].wait()
            killed = time.monotonic()
            procs["monitoring"] = start_service("monitoring", home / "monitoring", mp, mon_env)
            print(f"monitoring killed with {before:,} rows held, serving again after "
                  f"{time.monotonic() - killed:.1f} s", flush=True)
        out, _ = load.communicate(timeout=args.seconds + 60)
        h2 = parse_h2load(out, log, 1)
        if args.kill_at >= args.seconds:  # (one monitoring process throughout: its CPU is comparable)
            print(f"CPU during the load: inference {(cpu_seconds(workers) - cpu0[0]) / (args.seconds - 1):.2f} cores, "
                  f"monitoring {(cpu_seconds([procs['monitoring'].pid]) - cpu0[1]) / (args.seconds - 1):.2f} cores")
        stopped = time.monotonic()
        answered = rows = -1
        while time.monotonic() - stopped < 180:
            answered = int(metric(im, "strata_inference_predictions_total", endpoint=ENDPOINT, outcome="ok"))
            rows = logged(f"127.0.0.1:{mp}")
            if rows >= answered:
                break
            time.sleep(1)
        caught_up = time.monotonic() - stopped
        counters = {o: int(metric(im, "strata_inference_prediction_log_total", outcome=o))
                    for o in ("delivered", "spooled", "rejected", "dropped")}
        print(f"h2load: {h2['rps']:,.0f} requests/s, {h2['ok_2xx']:,} answered to h2load, p50 {h2.get('p50_ms')} ms, "
              f"p99 {h2.get('p99_ms')} ms, failed {h2.get('failed')}")
        print(f"prediction log: {counters}")
        print(f"predictions answered (inference's count): {answered:,}; rows logged (monitoring): {rows:,}; "
              f"caught up {caught_up:.1f} s after the load stopped")
        if rows != answered:
            raise SystemExit(f"FAILED: {answered - rows:+,} rows (answered - logged)")
        print("OK: every answered prediction logged once")
    finally:
        for proc in reversed(list(procs.values())):
            stop_process(proc)


if __name__ == "__main__":
    main()
