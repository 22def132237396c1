"""Predict by entity key, against real processes on this machine.

    .venv/bin/python -m tests.bench.inference_entities [--seconds 8] [--rounds 3] [--json out.json]

Starts a registry, the feature service (online store: the real Redis, database 10, emptied
before and after) and the inference service (their default serving processes, JWT auth on,
prediction logging on); defines a view of 20 FLOAT64 features for 10,000 users, pushes them,
registers a model whose lineage names those 20 features (one [batch, 1] input per feature, as the
training service exports them) and deploys it. Then h2load (C, Debian's nghttp2-client) posts a
pre-framed Predict with 1 and with 100 entity keys, at concurrency 8 (one connection with 8
streams, and 8 connections), for every round. Each request reads its entities' features from
the feature service (one GetOnlineFeatures, one Redis MGET) and runs the model; one request of
each body is checked for grpc-status 0 and the right number of rows first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from services.common.auth import mint_token
from tests.bench.inference_load import _cpu_seconds, check_grpc_ok, h2load
from tests.inference.models import columns_linear
from tests.processes import free_port, start_service, stop_process

SECRET = "bench-secret-0123456789abcdef0123"
PATH = "/strata.inference.v1.InferenceService/Predict"
FEATURES, USERS = 20, 10_000
REDIS_DB = 10


def _frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def _setup(work: Path, token: str, features_port: int, registry_addr: str) -> None:
    import grpc
    from strata.common.v1 import types_pb2
    from strata.features.v1 import features_pb2 as fpb
    from strata.features.v1 import features_pb2_grpc
    from strata.registry.v1 import registry_pb2 as rpb

    from services.clients.registry import RegistryClient

    md = (("authorization", f"Bearer {token}"),)
    names = [f"f{i:02d}" for i in range(FEATURES)]
    refs = [f"bench_user:{n}" for n in names]
    with grpc.insecure_channel(f"127.0.0.1:{features_port}") as ch:
        fs = features_pb2_grpc.FeatureServiceStub(ch)
        fs.ApplyEntity(fpb.ApplyEntityRequest(entity=fpb.Entity(name="user", join_key="user_id",
                                                                 value_type=fpb.VALUE_TYPE_INT64)), metadata=md)
        fs.ApplyFeatureView(fpb.ApplyFeatureViewRequest(feature_view=fpb.FeatureView(
            name="bench_user", entities=["user"], ttl_seconds=86400,
            features=[fpb.Feature(name=n, dtype=types_pb2.DATA_TYPE_FLOAT64) for n in names])), metadata=md)
        fs.ApplyFeatureSet(fpb.ApplyFeatureSetRequest(feature_set=fpb.FeatureSet(name="bench_user_v1", features=refs)),
                           metadata=md)
        x = np.random.default_rng(0).standard_normal((USERS, FEATURES))
        now = int(time.time() * 1e6)
        for lo in range(0, USERS, 2000):
            ids = list(range(lo, min(USERS, lo + 2000)))
            fs.PushFeatures(fpb.PushFeaturesRequest(
                view="bench_user", entities={"user_id": fpb.EntityColumn(int64_values=ids)},
                features=[fpb.FeatureValues(name=n, double_values=x[ids, j].tolist()) for j, n in enumerate(names)],
                event_timestamps_us=[now] * len(ids)), metadata=md)
    path = work / "by-key.onnx"
    path.write_bytes(columns_linear([f"bench_user__{n}" for n in names], list(np.linspace(-1, 1, FEATURES))))
    with RegistryClient(registry_addr, token) as reg:
        reg.register_onnx("bench-by-key", path, create_model=True, lineage=rpb.Lineage(
            features=refs, feature_views=["bench_user:1"], feature_set="bench_user_v1"))


def _body(work: Path, entities: int) -> Path:
    from google.protobuf import struct_pb2
    from strata.inference.v1 import inference_pb2 as pb

    ids = np.random.default_rng(entities).choice(USERS, entities, replace=False)
    req = pb.PredictRequest(endpoint="by-key", entities=[
        struct_pb2.Struct(fields={"user_id": struct_pb2.Value(number_value=float(i))}) for i in ids])
    body = work / f"by-key-{entities}.bin"
    body.write_bytes(_frame(req.SerializeToString()))
    return body


def _rows_body(work: Path) -> Path:
    """The same model scored from 20 values sent as one row (no feature read): the comparison."""
    from google.protobuf import struct_pb2
    from strata.inference.v1 import inference_pb2 as pb

    row = struct_pb2.Struct()
    row.update({f"bench_user__f{i:02d}": 0.5 for i in range(FEATURES)})
    body = work / "by-row.bin"
    body.write_bytes(_frame(pb.PredictRequest(endpoint="by-key", rows=[row]).SerializeToString()))
    return body


def _listening_pids(port: int) -> list[int]:
    import re
    import subprocess

    out = subprocess.run(["ss", "-ltnpH", f"( sport = :{port} )"], capture_output=True, text=True).stdout
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", out)})


def _check_rows(addr: str, token: str, body: Path, entities: int) -> None:
    import grpc
    from strata.inference.v1 import inference_pb2 as pb
    from strata.inference.v1 import inference_pb2_grpc

    req = pb.PredictRequest.FromString(body.read_bytes()[5:])
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(addr) as ch:
        resp = inference_pb2_grpc.InferenceServiceStub(ch).Predict(req, metadata=md)
    if len(resp.rows) != entities:
        raise SystemExit(f"Predict by entity key answered {len(resp.rows)} rows for {entities} entities")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    import redis
    online = redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
    online.flushdb()
    work = Path(tempfile.mkdtemp(prefix="strata-bench-entities-"))
    token = mint_token(SECRET, "bench", ["viewer", "developer"])
    auth = {"STRATA_JWT_SECRET": SECRET, "STRATA_LOG_LEVEL": "WARNING"}
    procs = []
    results: dict[str, list] = {}
    try:
        reg_port, feat_port, inf_port = free_port(), free_port(), free_port()
        procs.append(start_service("registry", work / "registry", reg_port, auth))
        procs.append(start_service("features", work / "features", feat_port, {
            **auth, "STRATA_FEATURES_ONLINE_STORE": f"redis://127.0.0.1:6379/{REDIS_DB}"}))
        _setup(work, token, feat_port, f"127.0.0.1:{reg_port}")
        procs.append(start_service("inference", work / "inference", inf_port, {
            **auth, "STRATA_REGISTRY_ADDR": f"127.0.0.1:{reg_port}", "STRATA_FEATURES_ADDR": f"127.0.0.1:{feat_port}"}))
        addr = f"127.0.0.1:{inf_port}"
        import grpc
        from strata.inference.v1 import inference_pb2 as pb
        from strata.inference.v1 import inference_pb2_grpc
        with grpc.insecure_channel(addr) as ch:
            target = pb.Target(model="bench-by-key", version=1, weight=1)
            inference_pb2_grpc.InferenceServiceStub(ch).CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(
                name="by-key", policy=pb.TrafficPolicy(targets=[target]))), metadata=(("authorization", f"Bearer {token}"),))
        url = f"http://{addr}{PATH}"
        bodies = {f"entities={n} x {FEATURES} features": (_body(work, n), n) for n in (1, 100)}
        bodies[f"rows=1 x {FEATURES} values (no feature read)"] = (_rows_body(work), 1)
        for body, n in bodies.values():
            check_grpc_ok(url, body, token)
            _check_rows(addr, token, body, n)
        feature_pids = _listening_pids(feat_port)
        for r in range(args.rounds):
            for name, (body, n) in bodies.items():
                for conns, streams in ((1, 8), (8, 1)):
                    key = f"{name} c={conns}x{streams}"
                    cpu0 = _cpu_seconds(feature_pids)
                    out = h2load(url, body, token, connections=conns, streams=streams, seconds=args.seconds,
                                 workdir=work, rows=n)
                    # The feature service's CPU over the whole run (warm-up included): an upper bound.
                    total = out["rps"] * (args.seconds + 2)
                    out["features_cpu_us_per_request"] = round((_cpu_seconds(feature_pids) - cpu0) / total * 1e6, 1) \
                        if total else None
                    results.setdefault(key, []).append(out)
                    print(f"round {r + 1}", key, out, flush=True)
    finally:
        for p in reversed(procs):
            stop_process(p)
        online.flushdb()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
