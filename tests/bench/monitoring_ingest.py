"""Ingestion benchmark: IngestPredictions against a running monitoring service, durable before
acknowledgement, then a drift report over what was ingested.

    .venv/bin/python -m tests.bench.monitoring_ingest [--rounds 3] [--batches 100]

A registry and the monitoring service run as real processes (STRATA_HOME in a temporary directory,
SQLite, local artifact store, auth off). Every message is a batch of 1,000 rows x 20 float32
features with a classifier's outputs (label, probabilities [rows, 2]), in three forms:

- arrow: one Arrow IPC batch (what bulk clients send);
- records: 1,000 prediction log records of one row each, as the inference service's log holds them
  (encoded by its predlog_format.Encoder);
- batch records: one prediction log record of 1,000 rows.

A round is one stream of --batches messages with new prediction ids, timed from the first message
to the response, which the service sends only once every row of the stream is fsync'd to its
write-ahead log; then one round re-sends the first arrow round (every row a duplicate). Messages are
serialised before the clock starts, so the client only sends bytes; client and service share the
machine's cores. Then a reference of 100,000 rows is set from a Parquet table (SetReference) and
GetDriftReport runs over every ingested row of the model version (a day's window), timed twice.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from strata.monitoring.v1 import monitoring_pb2 as pb
from strata.monitoring.v1 import monitoring_pb2_grpc

from services.clients.registry import RegistryClient
from tests.monitoring.conftest import arrow_ipc, classifier_onnx, records
from tests.processes import free_port, start_service, stop_process

FEATURES = [f"bench__f{i:02d}" for i in range(20)]
ROWS = 1000
PATH = "/strata.monitoring.v1.MonitoringService/IngestPredictions"


def columns(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    x = {f: rng.normal(size=n).astype(np.float32) for f in FEATURES}
    p1 = rng.random(n).astype(np.float32)
    return x, {"label": (p1 > 0.5).astype(np.int64), "probabilities": np.column_stack((1 - p1, p1))}


def arrow_message(rng: np.random.Generator, prefix: str) -> bytes:
    x, y = columns(rng, ROWS)
    table = pa.table({"prediction_id": [f"{prefix}-{i}" for i in range(ROWS)], "endpoint": ["bench"] * ROWS,
                      "model": ["bench-model"] * ROWS, "version": np.ones(ROWS, np.int64),
                      "time": pa.array([datetime.now(UTC)] * ROWS, pa.timestamp("us", tz="UTC")), **x,
                      "label": y["label"], "probabilities[0]": y["probabilities"][:, 0],
                      "probabilities[1]": y["probabilities"][:, 1]})
    return pb.IngestPredictionsRequest(arrow_ipc=arrow_ipc(table), output_columns=[
        "label", "probabilities[0]", "probabilities[1]"]).SerializeToString()


def records_message(rng: np.random.Generator, prefix: str, per_record: int) -> bytes:
    x, y = columns(rng, ROWS)
    ids = [f"{prefix}-{i}" for i in range(ROWS // per_record)]
    return pb.IngestPredictionsRequest(records=records(ids, x, y, endpoint="bench", model="bench-model")
                                       ).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=100, help="messages of 1,000 rows per round")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="strata-mbench-"))
    rp, mp = free_port(), free_port()
    env = {"STRATA_AUTH": "disabled", "STRATA_LOG_LEVEL": "WARNING", "STRATA_REGISTRY_ADDR": f"127.0.0.1:{rp}"}
    procs = [start_service("registry", home, rp, env)]
    try:
        procs.append(start_service("monitoring", home, mp, env))
        run(home, f"127.0.0.1:{rp}", f"127.0.0.1:{mp}", args.rounds, args.batches)
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def run(home: Path, registry: str, monitoring: str, rounds: int, batches: int) -> None:
    rng = np.random.default_rng(7)
    forms = {"arrow": lambda p: arrow_message(rng, p), "records": lambda p: records_message(rng, p, 1),
             "batch records": lambda p: records_message(rng, p, ROWS)}
    print(f"messages of {ROWS:,} rows x {len(FEATURES)} features; {batches} messages "
          f"({batches * ROWS:,} rows) per round")
    channel = grpc.insecure_channel(monitoring, options=[("grpc.max_send_message_length", 64 << 20)])
    ingest = channel.stream_unary(PATH, request_serializer=lambda b: b,
                                  response_deserializer=pb.IngestPredictionsResponse.FromString)
    first: list[bytes] = []
    total = 0
    for form, make in forms.items():
        for r in range(rounds):
            messages = [make(f"{form[0]}{r}-{b}") for b in range(batches)]
            mb = sum(map(len, messages)) / 1e6
            start = time.perf_counter()
            got = ingest(iter(messages), timeout=600)
            seconds = time.perf_counter() - start
            assert got.stored == batches * ROWS, got
            total += got.stored
            print(f"{form:14s} round {r + 1}: {got.stored / seconds:>10,.0f} rows/s  ({seconds:.2f} s, "
                  f"{mb / seconds:.0f} MB/s of messages)")
            if form == "arrow" and r == 0:
                first = messages
    start = time.perf_counter()
    got = ingest(iter(first), timeout=600)
    seconds = time.perf_counter() - start
    assert got.duplicates == batches * ROWS, got
    print(f"{'arrow re-sent':14s}        : {got.duplicates / seconds:>10,.0f} rows/s  ({seconds:.2f} s, "
          "every row a duplicate)")

    x, y = columns(rng, 100_000)
    (home / "artifacts" / "refs").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({**x, "label": y["label"]}), home / "artifacts" / "refs" / "bench.parquet")
    onnx = home / "bench.onnx"
    onnx.write_bytes(classifier_onnx(FEATURES))
    with RegistryClient(registry) as client:
        version = client.register_onnx("bench-model", onnx, create_model=True).version
    stub = monitoring_pb2_grpc.MonitoringServiceStub(channel)
    start = time.perf_counter()
    stub.SetReference(pb.SetReferenceRequest(model="bench-model", version=version, table_uri="refs/bench.parquet"))
    print(f"SetReference (100,000 rows x {len(FEATURES) + 1} columns): {time.perf_counter() - start:.2f} s")
    for attempt in (1, 2):
        start = time.perf_counter()
        report = stub.GetDriftReport(pb.GetDriftReportRequest(model="bench-model", version=version), timeout=600)
        seconds = time.perf_counter() - start
        (v,) = report.versions
        print(f"GetDriftReport over {v.rows:,} rows ({total:,} ingested) x {len(v.features)} features + "
              f"{len(v.predictions)} output, run {attempt}: {seconds:.2f} s; {v.drifted_features} drifted")
    channel.close()


if __name__ == "__main__":
    main()
