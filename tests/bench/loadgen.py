"""Closed-loop gRPC load generators (one process, asyncio): `concurrency` callers each send the
next request as soon as the previous answer arrives, for `seconds` after a warm-up.

    python -m tests.bench.loadgen triton  ADDR MODEL BATCH CONCURRENCY SECONDS
    python -m tests.bench.loadgen predict ADDR ENDPOINT BATCH CONCURRENCY SECONDS

Prints one JSON line: requests, seconds, throughput (requests/s and rows/s), p50/p95/p99 (ms).
`triton` drives the stock tritonclient.grpc.aio client (V2 ModelInfer); `predict` the
platform's own Predict with raw tensors. Python clients spend CPU of their own: on a 2-core
machine they compete with the server, which is why the headline figures use h2load.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import numpy as np


def summary(latencies: list[float], seconds: float, batch: int) -> dict:
    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "seconds": round(seconds, 2), "rps": round(len(lat) / seconds, 1),
            "rows_per_s": round(len(lat) * batch / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3), "p95_ms": round(float(np.percentile(lat, 95)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3)}


async def closed_loop(call, concurrency: int, seconds: float, warmup: float = 1.0) -> tuple[list[float], float]:  # noqa: ANN001
    latencies: list[float] = []
    start = time.perf_counter() + warmup
    end = start + seconds

    async def worker() -> None:
        while (now := time.perf_counter()) < end:
            await call()
            done = time.perf_counter()
            if now >= start:
                latencies.append(done - now)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, seconds


async def triton(addr: str, model: str, batch: int, concurrency: int, seconds: float) -> dict:
    import tritonclient.grpc.aio as tca
    from tritonclient.grpc import InferInput, InferRequestedOutput

    client = tca.InferenceServerClient(addr)
    inp = InferInput("input", [batch, 32], "FP32")
    inp.set_data_from_numpy(np.random.default_rng(0).standard_normal((batch, 32)).astype(np.float32))
    out = [InferRequestedOutput("output")]

    headers = {"authorization": f"Bearer {os.environ['BENCH_TOKEN']}"} if os.environ.get("BENCH_TOKEN") else None

    async def call() -> None:
        await client.infer(model, [inp], outputs=out, headers=headers)
    lat, secs = await closed_loop(call, concurrency, seconds)
    await client.close()
    return summary(lat, secs, batch)


async def predict(addr: str, endpoint: str, batch: int, concurrency: int, seconds: float) -> dict:
    import grpc
    from strata.inference.v1 import inference_pb2 as pb
    from strata.inference.v1 import inference_pb2_grpc

    x = np.random.default_rng(0).standard_normal((batch, 32)).astype(np.float32)
    req = pb.PredictRequest(endpoint=endpoint, inputs=[pb.Tensor(name="input", shape=[batch, 32], raw=x.tobytes())])
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        md = (("authorization", f"Bearer {os.environ['BENCH_TOKEN']}"),) if os.environ.get("BENCH_TOKEN") else None

        async def call() -> None:
            await stub.Predict(req, metadata=md)
        lat, secs = await closed_loop(call, concurrency, seconds)
    return summary(lat, secs, batch)


def main() -> None:
    kind, addr, target, batch, concurrency, seconds = sys.argv[1:7]
    fn = {"triton": triton, "predict": predict}[kind]
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(fn(addr, target, int(batch), int(concurrency), float(seconds)))))


if __name__ == "__main__":
    main()
