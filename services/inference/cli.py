"""The `strata` subcommands of the inference service (hooked into services/cli.py):

    strata deploy ENDPOINT MODEL (--version V | --alias A) [--max-batch-size N] [--description D] [--production]
    strata traffic set ENDPOINT MODEL:VERSION=WEIGHT ... [--shadow MODEL:VERSION] [--sticky]
                       [--canary INDEX --max-error-rate R --max-p99-ms MS --min-requests N]
    strata rollback ENDPOINT
    strata endpoints list | show NAME | revisions NAME | stats NAME | delete NAME
    strata predict ENDPOINT --file rows.json|rows.csv [--input NAME] [--routing-key KEY]

The inference service's address comes from --inference-addr or STRATA_INFERENCE_ADDR (default
127.0.0.1:50054). A JSON file holds a list of rows ({input name: value}); a CSV file's header
names the inputs, or, with --input NAME, all its columns form that one input, row by row.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

from google.protobuf import json_format, struct_pb2
from strata.inference.v1 import inference_pb2 as pb
from strata.inference.v1 import inference_pb2_grpc

from services.common.client import open_channel
from services.common.settings import peer_address

COMMANDS = ("deploy", "traffic", "rollback", "endpoints", "predict")


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parent.add_argument("--inference-addr", default=os.environ.get("STRATA_INFERENCE_ADDR", peer_address("inference")))
    dep = sub.add_parser("deploy", help="create an endpoint serving a model version")
    dep.add_argument("endpoint")
    dep.add_argument("model")
    dep.add_argument("--version", type=int, default=0)
    dep.add_argument("--alias", default="")
    dep.add_argument("--description", default="")
    dep.add_argument("--max-batch-size", type=int, default=0)
    dep.add_argument("--max-queue-delay-us", type=int, default=0)
    dep.add_argument("--production", action="store_true",
                     help="serve only approved versions (lifting the mark later needs the approver role)")
    tr = sub.add_parser("traffic", help="traffic policies").add_subparsers(dest="action", required=True)
    ts = tr.add_parser("set", help="replace an endpoint's policy (A/B, canary, shadow, blue/green)")
    ts.add_argument("endpoint")
    ts.add_argument("targets", nargs="+", metavar="MODEL:VERSION=WEIGHT")
    ts.add_argument("--shadow", action="append", default=[], metavar="MODEL:VERSION")
    ts.add_argument("--sticky", action="store_true", help="route by --routing-key when given")
    ts.add_argument("--canary", type=int, metavar="INDEX", help="target index of the canary")
    ts.add_argument("--max-error-rate", type=float, default=0.0)
    ts.add_argument("--max-p99-ms", type=float, default=0.0)
    ts.add_argument("--min-requests", type=int, default=100)
    ts.add_argument("--reason", default="")
    sub.add_parser("rollback", help="restore an endpoint's previous policy").add_argument("endpoint")
    ep = sub.add_parser("endpoints", help="endpoints").add_subparsers(dest="action", required=True)
    ep.add_parser("list")
    for verb in ("show", "revisions", "stats", "delete"):
        ep.add_parser(verb).add_argument("name")
    pr = sub.add_parser("predict", help="score rows from a JSON or CSV file through an endpoint")
    pr.add_argument("endpoint")
    pr.add_argument("--file", type=Path, required=True)
    pr.add_argument("--input", default="", help="CSV: all columns form this one input")
    pr.add_argument("--routing-key", default="")


def _target(spec: str, weighted: bool) -> pb.Target:
    ref, _, weight = spec.partition("=") if weighted else (spec, "", "")
    model, sep, version = ref.rpartition(":")
    if not sep or not model or not version.isdigit() or (weighted and not weight.isdigit()):
        form = "MODEL:VERSION=WEIGHT" if weighted else "MODEL:VERSION"
        raise SystemExit(f"error: {spec!r} must be {form}")
    return pb.Target(model=model, version=int(version), weight=int(weight or 0))


def read_rows(path: Path, single_input: str = "") -> list[struct_pb2.Struct]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            records = [{k: float(v) for k, v in row.items()} for row in reader]
        if single_input:
            records = [{single_input: list(r.values())} for r in records]
    else:
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise SystemExit(f"error: {path}: expected a JSON list of rows ({{input name: value}})")
    rows = []
    for r in records:
        s = struct_pb2.Struct()
        s.update(r)
        rows.append(s)
    return rows


def _endpoint_line(e: pb.Endpoint) -> str:
    targets = ", ".join(f"{t.model}:v{t.version}={t.weight}" for t in e.policy.targets)
    shadows = ", ".join(f"{t.model}:v{t.version}" for t in e.policy.shadows)
    return (f"{e.name:<24} rev {e.revision:<4} {targets}" + (f"  shadow {shadows}" if shadows else "")
            + ("  [production]" if e.production else ""))


def run(args: argparse.Namespace) -> int:
    raw, channel = open_channel(args.inference_addr, args.token, args.tls_ca)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)

    def show(msg, line=None) -> None:  # noqa: ANN001
        if args.json or line is None:
            print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2))
        else:
            print(line(msg))
    try:
        if args.cmd == "deploy":
            policy = pb.TrafficPolicy(targets=[pb.Target(model=args.model, version=args.version, alias=args.alias,
                                                         weight=1)],
                                      batching=pb.BatchingConfig(max_batch_size=args.max_batch_size,
                                                                 max_queue_delay_us=args.max_queue_delay_us))
            e = stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(
                name=args.endpoint, description=args.description, policy=policy,
                production=args.production))).endpoint
            show(e, _endpoint_line)
        elif args.cmd == "traffic":
            policy = pb.TrafficPolicy(targets=[_target(t, True) for t in args.targets],
                                      shadows=[_target(s, False) for s in args.shadow], sticky=args.sticky)
            if args.canary is not None:
                policy.canary.CopyFrom(pb.CanaryLimits(target_index=args.canary, max_error_rate=args.max_error_rate,
                                                       max_p99_ms=args.max_p99_ms, min_requests=args.min_requests))
            e = stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(endpoint=args.endpoint, policy=policy,
                                                                 reason=args.reason)).endpoint
            show(e, _endpoint_line)
        elif args.cmd == "rollback":
            show(stub.RollbackTrafficPolicy(pb.RollbackTrafficPolicyRequest(endpoint=args.endpoint)).endpoint,
                 _endpoint_line)
        elif args.cmd == "endpoints" and args.action == "list":
            for e in stub.ListEndpoints(pb.ListEndpointsRequest(page_size=500)).endpoints:
                show(e, _endpoint_line)
        elif args.cmd == "endpoints" and args.action == "show":
            show(stub.GetEndpoint(pb.GetEndpointRequest(name=args.name)).endpoint)
        elif args.cmd == "endpoints" and args.action == "revisions":
            for r in stub.ListPolicyRevisions(pb.ListPolicyRevisionsRequest(endpoint=args.name)).revisions:
                show(r, lambda r: f"rev {r.revision:<4} {r.create_time.ToJsonString()}  {r.created_by:<20} "
                                  f"{', '.join(f'{t.model}:v{t.version}={t.weight}' for t in r.policy.targets)}"
                                  f"  ({r.reason})")
        elif args.cmd == "endpoints" and args.action == "stats":
            show(stub.GetEndpointStats(pb.GetEndpointStatsRequest(endpoint=args.name)))
        elif args.cmd == "endpoints" and args.action == "delete":
            stub.DeleteEndpoint(pb.DeleteEndpointRequest(name=args.name))
        elif args.cmd == "predict":
            r = stub.Predict(pb.PredictRequest(endpoint=args.endpoint, rows=read_rows(args.file, args.input),
                                               routing_key=args.routing_key))
            show(r)
    finally:
        raw.close()
    return 0
