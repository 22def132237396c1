"""The `strata features` subcommands (hooked into services/cli.py):

    strata features apply definitions.yaml        entities and feature views from YAML
    strata features list [--query Q] [--entity E]
    strata features materialize VIEW [--start ISO] [--end ISO]   with a progress bar
    strata features get VIEW:FEATURE ... --entity user_id=1,2,3   (or --feature-set NAME)
    strata features stats VIEW
    strata features training-set --entities rows.parquet VIEW:FEATURE ... -o train.parquet
                                                            (or --feature-set NAME)

The feature service's address comes from --features-addr or STRATA_FEATURES_ADDR (default
127.0.0.1:50052). YAML: `entities: [{name, join_key, value_type: INT64|STRING}]` and
`feature_views: [{name, entities, ttl_seconds, source: {path, timestamp_field}, features:
[{name, dtype: FLOAT64|INT64|..., validation: {min, max, allowed_values, max_null_rate}}]}]` and
`feature_sets: [{name, features: [VIEW:FEATURE, ...], owner, description}]` (what a model reads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import yaml
from google.protobuf import json_format
from strata.features.v1 import features_pb2 as pb
from strata.features.v1 import features_pb2_grpc

from services.common.client import open_channel
from services.common.settings import peer_address


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parent.add_argument("--features-addr", default=os.environ.get("STRATA_FEATURES_ADDR", peer_address("features")))
    fs = sub.add_parser("features", help="feature store").add_subparsers(dest="action", required=True)
    fs.add_parser("apply").add_argument("file", type=Path)
    ls = fs.add_parser("list")
    ls.add_argument("--query", default="")
    ls.add_argument("--entity", default="")
    mat = fs.add_parser("materialize")
    mat.add_argument("view")
    mat.add_argument("--start", default="", help="ISO time (exclusive); default: where the last run ended")
    mat.add_argument("--end", default="", help="ISO time (inclusive); default: now")
    get = fs.add_parser("get")
    get.add_argument("features", nargs="*", metavar="VIEW:FEATURE")
    get.add_argument("--feature-set", default="", help="the features of this feature set instead")
    get.add_argument("--entity", action="append", required=True, metavar="JOIN_KEY=V1,V2,...")
    fs.add_parser("stats").add_argument("view")
    ts = fs.add_parser("training-set", help="point-in-time training set to a local Parquet file")
    ts.add_argument("features", nargs="*", metavar="VIEW:FEATURE")
    ts.add_argument("--feature-set", default="", help="the features of this feature set instead")
    ts.add_argument("--entities", type=Path, required=True, help="Parquet: join keys + event_timestamp")
    ts.add_argument("--timestamp-column", default="event_timestamp")
    ts.add_argument("--filter-by-created-timestamp", action="store_true",
                    help="a value counts only once created (no backfills seen by earlier rows)")
    ts.add_argument("-o", "--output", type=Path, required=True)


def _us(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1e6) if text else 0


def _view(d: dict) -> pb.FeatureView:
    d = dict(d)
    for f in d.get("features", []):
        if "dtype" in f and not str(f["dtype"]).startswith("DATA_TYPE_"):
            f["dtype"] = f"DATA_TYPE_{f['dtype']}"
        rule = f.get("validation") or {}
        for bound in ("min", "max", "max_null_rate"):
            if bound in rule:
                rule[f"has_{bound}"] = True
    return json_format.ParseDict(d, pb.FeatureView())


def _entity(d: dict) -> pb.Entity:
    d = dict(d)
    if "value_type" in d and not str(d["value_type"]).startswith("VALUE_TYPE_"):
        d["value_type"] = f"VALUE_TYPE_{d['value_type']}"
    return json_format.ParseDict(d, pb.Entity())


def run(args: argparse.Namespace) -> int:
    raw, channel = open_channel(args.features_addr, args.token, args.tls_ca)
    stub = features_pb2_grpc.FeatureServiceStub(channel)
    try:
        if args.action == "apply":
            spec = yaml.safe_load(args.file.read_text()) or {}
            for e in spec.get("entities", []):
                stub.ApplyEntity(pb.ApplyEntityRequest(entity=_entity(e)))
                print(f"entity {e['name']}: applied")
            for v in spec.get("feature_views", []):
                r = stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=_view(v)))
                print(f"feature view {r.feature_view.name}: {r.outcome} (version {r.feature_view.version})")
            for fs in spec.get("feature_sets", []):
                r = stub.ApplyFeatureSet(pb.ApplyFeatureSetRequest(feature_set=json_format.ParseDict(fs, pb.FeatureSet())))
                print(f"feature set {r.feature_set.name}: {r.outcome} ({len(r.feature_set.features)} features)")
        elif args.action == "list":
            for v in stub.ListFeatureViews(pb.ListFeatureViewsRequest(query=args.query, entity=args.entity,
                                                                      page_size=500)).feature_views:
                print(f"{v.name:<32} v{v.version:<3} entities {','.join(v.entities):<20} "
                      f"{len(v.features)} features  owner {v.owner or '-'}")
        elif args.action == "materialize":
            last = None
            for p in stub.Materialize(pb.MaterializeRequest(view=args.view, start_us=_us(args.start),
                                                            end_us=_us(args.end))):
                last = p
                width = 40
                done = int(width * p.rows_written / p.rows_total) if p.rows_total else width
                sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {p.rows_written:,}/{p.rows_total:,} rows")
                sys.stderr.flush()
            sys.stderr.write("\n")
            if last is not None:
                print(f"{args.view} v{last.view_version}: {last.rows_written:,} rows materialized for "
                      f"({last.start_us}, {last.end_us}]")
        elif args.action == "get":
            entities = {}
            for item in args.entity:
                key, _, values = item.partition("=")
                parts = [v for v in values.split(",") if v]
                entities[key] = (pb.EntityColumn(int64_values=[int(v) for v in parts])
                                 if all(v.lstrip("-").isdigit() for v in parts)
                                 else pb.EntityColumn(string_values=parts))
            r = stub.GetOnlineFeatures(pb.GetOnlineFeaturesRequest(features=args.features, entities=entities,
                                                                   feature_set=args.feature_set))
            print(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True), indent=2))
        elif args.action == "training-set":
            import pyarrow as pa
            import pyarrow.parquet as pq
            entities = pq.read_table(args.entities)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, entities.schema) as w:
                w.write_table(entities)
            parts = stub.GetHistoricalFeatures(pb.GetHistoricalFeaturesRequest(
                features=args.features, entity_arrow=sink.getvalue().to_pybytes(),
                timestamp_column=args.timestamp_column, feature_set=args.feature_set,
                filter_by_created_timestamp=args.filter_by_created_timestamp))
            table = pa.concat_tables(pa.ipc.open_stream(p.arrow_ipc).read_all() for p in parts)
            from services.features.offline import write_parquet
            digest = write_parquet(table, args.output)
            print(f"{args.output}: {table.num_rows:,} rows, {table.num_columns - entities.num_columns} features, sha256 {digest}")
        elif args.action == "stats":
            r = stub.GetFeatureStatistics(pb.GetFeatureStatisticsRequest(view=args.view))
            print(json.dumps(json_format.MessageToDict(r, preserving_proto_field_name=True), indent=2))
    finally:
        raw.close()
    return 0
