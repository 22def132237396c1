"""Online feature retrieval benchmark: GetOnlineFeatures over gRPC with the online store on the
real Redis at 127.0.0.1:6379, measured with h2load (pre-framed gRPC requests, as in
tests/bench/inference_load.py), JWT auth on.

    .venv/bin/python -m tests.bench.features_online [--seconds 8]

Two views keyed by different entities (user: int64 keys, merchant: string keys), 10 float
features each, 10,000 entities each pushed first. Requests: 1 entity x 10 features (one view),
and 100 entities x 20 features (both views).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as pb
from strata.features.v1 import features_pb2_grpc

from services.common.auth import mint_token
from tests.bench.inference_load import check_grpc_ok, h2load
from tests.processes import free_port, start_service, stop_process

SECRET = "bench-secret-0123456789abcdef0123"
PATH = "/strata.features.v1.FeatureService/GetOnlineFeatures"
N = 10_000
REDIS_URL = "redis://127.0.0.1:6379/0"


def frame(msg: pb.GetOnlineFeaturesRequest) -> bytes:
    d = msg.SerializeToString()
    return b"\x00" + struct.pack(">I", len(d)) + d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", default="", help="run only the cases whose label contains this (e.g. '100 entities', 'c=8x1')")
    ap.add_argument("--repeat", type=int, default=1, help="run each case this many times")
    ap.add_argument("--gateway", action="store_true",
                    help="also through the real Envoy gateway: gRPC passed through, and REST/JSON (typed)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="strata-fbench-"))
    token = mint_token(SECRET, "bench", ["developer"])
    md = (("authorization", f"Bearer {token}"),)
    port = free_port()
    proc = start_service("features", work, port, {"STRATA_JWT_SECRET": SECRET, "STRATA_LOG_LEVEL": "WARNING",
                                                 "STRATA_FEATURES_ONLINE_STORE": REDIS_URL})
    results = {}
    views: dict[str, str] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            s = features_pb2_grpc.FeatureServiceStub(ch)
            suffix = time.strftime("%H%M%S")
            s.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="user", join_key="user_id",
                                                                 value_type=pb.VALUE_TYPE_INT64)), metadata=md)
            s.ApplyEntity(pb.ApplyEntityRequest(entity=pb.Entity(name="merchant", join_key="merchant_id",
                                                                 value_type=pb.VALUE_TYPE_STRING)), metadata=md)
            rng = np.random.default_rng(0)
            for entity, key in (("user", "user_id"), ("merchant", "merchant_id")):
                name = f"bench_{entity}_{suffix}"
                feats = [pb.Feature(name=f"f{i}", dtype=types_pb2.DATA_TYPE_FLOAT64) for i in range(10)]
                s.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=pb.FeatureView(
                    name=name, entities=[entity], features=feats, ttl_seconds=86400 * 7)), metadata=md)
                keys = (pb.EntityColumn(int64_values=range(N)) if entity == "user"
                        else pb.EntityColumn(string_values=[f"m{i}" for i in range(N)]))
                s.PushFeatures(pb.PushFeaturesRequest(
                    view=name, entities={key: keys}, event_timestamps_us=[int(time.time() * 1e6)] * N,
                    features=[pb.FeatureValues(name=f"f{i}", double_values=rng.random(N).tolist()) for i in range(10)]),
                    metadata=md)
                views[entity] = name
        ids = rng.choice(N, 100, replace=False)
        small = pb.GetOnlineFeaturesRequest(raw=True, features=[f"{views['user']}:f{i}" for i in range(10)],
                                            entities={"user_id": pb.EntityColumn(int64_values=[int(ids[0])])})
        big = pb.GetOnlineFeaturesRequest(raw=True,
            features=[f"{views[e]}:f{i}" for e in ("user", "merchant") for i in range(10)],
            entities={"user_id": pb.EntityColumn(int64_values=[int(i) for i in ids]),
                      "merchant_id": pb.EntityColumn(string_values=[f"m{i}" for i in ids])})
        url = f"http://127.0.0.1:{port}{PATH}"
        for label, msg in (("1 entity x 10 features", small), ("100 entities x 20 features (2 views)", big)):
            body = work / "req.bin"
            body.write_bytes(frame(msg))
            check_grpc_ok(url, body, token)
            results.update(_load(label, url, body, token, work, args))
        if args.gateway:
            results.update(_through_gateway(work, port, token, small, big, args))
    finally:
        stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)
        _drop_keys(list(views.values()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _load(label: str, url: str, body: Path, token: str, work: Path, args: argparse.Namespace,
          content_type: str = "application/grpc") -> dict:
    """h2load at 1x1, 1x8 and 8x1 (connections x streams), `--repeat` times each, `--only` honoured."""
    out = {}
    for conns, streams in ((1, 1), (1, 8), (8, 1)):
        for run in range(args.repeat):
            key = f"{label} c={conns}x{streams}" + (f" run {run + 1}" if args.repeat > 1 else "")
            if args.only not in key:
                continue
            out[key] = h2load(url, body, token, connections=conns, streams=streams, seconds=args.seconds,
                              workdir=work, rows=1, content_type=content_type)
            print(key, out[key], flush=True)
    return out


def _through_gateway(work: Path, port: int, token: str, small: pb.GetOnlineFeaturesRequest,
                     big: pb.GetOnlineFeaturesRequest, args: argparse.Namespace) -> dict:
    """The same reads through the real Envoy gateway (JWT checked at the edge and in the service):
    gRPC passed through (raw), and REST/JSON transcoded (typed values, as a REST client reads
    them). `server_cpu_us_per_request` is then Envoy's CPU (the process holding the client's
    connections)."""
    from google.protobuf import json_format

    from gateway.config import render_envoy_config
    from gateway.envoy import start_envoy, wait_ready, write_config
    from tests.processes import ROOT
    gw_port, admin_port = free_port(), free_port()
    config = render_envoy_config(
        upstreams={"features": f"127.0.0.1:{port}"}, descriptor_path=ROOT / "gateway" / "strata.pb",
        jwt_secret=SECRET, listen_host="127.0.0.1", listen_port=gw_port, admin_port=admin_port,
        rate_limit_per_second=1_000_000)
    envoy = start_envoy(write_config(config, work / "gateway"), work / "envoy.log")
    out = {}
    try:
        wait_ready(admin_port, 20, process=envoy)
        cases = []
        for label, msg in (("1 entity x 10 features", small), ("100 entities x 20 features (2 views)", big)):
            body = work / f"gw-{len(cases)}.bin"
            body.write_bytes(frame(msg))
            url = f"http://127.0.0.1:{gw_port}{PATH}"
            check_grpc_ok(url, body, token)
            cases.append((f"gateway grpc {label}", url, body, "application/grpc"))
            typed = pb.GetOnlineFeaturesRequest()
            typed.CopyFrom(msg)
            typed.raw = False
            body = work / f"gw-{len(cases)}.json"
            body.write_text(json_format.MessageToJson(typed))
            url = f"http://127.0.0.1:{gw_port}/v1/features:getOnline"
            probe = subprocess.run(["curl", "-sS", "-H", f"authorization: Bearer {token}", "--data-binary",
                                    f"@{body}", url], capture_output=True, text=True, check=True).stdout
            if '"FEATURE_STATUS_PRESENT"' not in probe:
                raise SystemExit(f"REST read through Envoy failed: {probe[:500]}")
            cases.append((f"gateway rest {label}", url, body, "application/json"))
        for name, url, body, content_type in cases:
            out.update(_load(name, url, body, token, work, args, content_type))
    finally:
        stop_process(envoy)
    return out


def _drop_keys(views: list[str]) -> None:
    """The benchmark's rows out of the shared Redis (keys sf:{view}:v{version}:{entity})."""
    import redis
    client = redis.Redis.from_url(REDIS_URL)
    for view in views:
        batch = []
        for key in client.scan_iter(f"sf:{view}:*", count=5000):
            batch.append(key)
            if len(batch) == 5000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)
    client.close()


if __name__ == "__main__":
    main()
