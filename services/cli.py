"""`strata`: the command line for everyday registry work and for running the platform locally.

    strata up [--demo] [--host H] [--gateway-port P] [--no-auth]   run the platform in the foreground
    strata demo                                 the demo against a running platform
    strata register NAME model.onnx --create-model --metric auc=0.93
    strata models list | models show NAME | versions list NAME | versions show NAME VERSION
    strata alias set NAME ALIAS VERSION | alias delete NAME ALIAS
    strata promote request NAME VERSION [--alias production] | promote approve ID | promote list
    strata download NAME (VERSION | --alias A) -o FILE
    strata card NAME VERSION | audit | token --sub NAME --role ROLE
    strata deploy | traffic set | rollback | endpoints ... | predict   (see services/inference/cli.py)
    strata features apply | list | materialize | get | stats          (see services/features/cli.py)
    strata train submit job.yaml --watch | train watch JOB | runs compare RUN...  (services/training/cli.py)
    strata monitor drift|quality|performance [ENDPOINT] [--model M --version V] [--since 6h] [--json]
    strata monitor report [ENDPOINT] [--model M --version V] [--since 6h] --html report.html

The registry address comes from --addr or STRATA_REGISTRY_ADDR (default 127.0.0.1 at
STRATA_REGISTRY_PORT, 50051: the same settings as `strata up`), the bearer token from --token or
STRATA_TOKEN, TLS from the STRATA_TLS_* settings (`source .strata/tokens.env` sets both for a
platform started by `strata up`). Errors print `error: CODE: message`, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from strata.monitoring.v1 import monitoring_pb2 as mpb
from strata.registry.v1 import registry_pb2 as pb

from services.clients.monitoring import MonitoringClient, time_window
from services.clients.registry import RegistryClient
from services.common.settings import admin_port, listen_port, peer_address
from services.features import cli as features_cli
from services.inference import cli as inference_cli
from services.training import cli as training_cli


def parse_pairs(items: Iterable[str], what: str, value: Callable[[str], object] = str) -> dict:
    """['a=1', 'b=2'] -> {'a': value('1'), ...}; a malformed item is a usage error naming it."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: {what} {item!r} must be KEY=VALUE")
        try:
            out[key] = value(raw)
        except ValueError:
            raise SystemExit(f"error: {what} {item!r}: {raw!r} is not a number") from None
    return out


def _print(msg: Message | Iterable[Message], as_json: bool, table: Callable[[Message], str]) -> None:
    items = [msg] if isinstance(msg, Message) else list(msg)
    if as_json:
        out = [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in items]
        print(json.dumps(out[0] if isinstance(msg, Message) else out, indent=2))
    else:
        for m in items:
            print(table(m))


def _model_line(m: pb.RegisteredModel) -> str:
    aliases = ", ".join(f"{a}->v{v}" for a, v in sorted(m.aliases.items()))
    return f"{m.name:<32} latest v{m.latest_version:<4} owner {m.owner or '-':<16} {aliases}"


def _version_line(v: pb.ModelVersion) -> str:
    status = pb.ModelVersionStatus.Name(v.status).removeprefix("MODEL_VERSION_STATUS_").lower()
    stage = pb.Stage.Name(v.stage).removeprefix("STAGE_").lower().replace("unspecified", "-")
    size = f"{v.artifact.size_bytes:,} B" if v.artifact.sha256 else ""
    return (f"{v.name} v{v.version:<4} {v.framework:<8} {status:<15} {stage:<10} "
            f"{','.join(v.aliases) or '-':<20} {size}")


def _version_detail(v: pb.ModelVersion) -> str:
    lines = [_version_line(v)]
    if v.artifact.sha256:
        lines.append(f"  artifact {v.artifact.uri}  sha256 {v.artifact.sha256}")
    for kind, specs in (("in ", v.signature.inputs), ("out", v.signature.outputs)):
        for t in specs:
            dtype = t.DESCRIPTOR.fields_by_name["dtype"].enum_type.values_by_number[t.dtype].name
            lines.append(f"  {kind} {t.name}: {dtype.removeprefix('DATA_TYPE_').lower()}{list(t.shape)}")
    if v.metrics:
        lines.append("  metrics " + ", ".join(f"{k}={val:g}" for k, val in sorted(v.metrics.items())))
    return "\n".join(lines)


def _promotion_line(p: pb.Promotion) -> str:
    state = pb.PromotionState.Name(p.state).removeprefix("PROMOTION_STATE_").lower()
    return (f"{p.promotion_id}  {p.name} v{p.version} -> {p.alias:<12} {state:<9} "
            f"by {p.requested_by}{'  decided by ' + p.decided_by if p.decided_by else ''}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="strata", description="Strata ML platform command line")
    ap.add_argument("--addr", default=peer_address("registry"),
                    help="registry host:port (STRATA_REGISTRY_ADDR, else 127.0.0.1:STRATA_REGISTRY_PORT)")
    ap.add_argument("--token", default=os.environ.get("STRATA_TOKEN"), help="bearer token (STRATA_TOKEN)")
    ap.add_argument("--tls-ca", type=Path, help="use TLS with this CA bundle (default: the STRATA_TLS_* settings; "
                                                "client certificate from STRATA_TLS_CLIENT_CERT_FILE/KEY_FILE)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = ap.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run the platform locally (services + Envoy gateway), supervised")
    up.add_argument("--demo", action="store_true", help="run the demo once everything is up")
    up.add_argument("--home", type=Path, default=Path(os.environ.get("STRATA_HOME", ".strata")))
    up.add_argument("--no-auth", action="store_true", help="STRATA_AUTH=disabled (local development only)")
    up.add_argument("--host", default=None,
                    help="address the services and the gateway listen on (default STRATA_HOST or 127.0.0.1; "
                         "0.0.0.0 for every interface)")
    up.add_argument("--gateway-port", type=int, default=listen_port("gateway"), help="(STRATA_GATEWAY_PORT)")
    up.add_argument("--admin-port", type=int, default=admin_port(),
                    help="Envoy admin, loopback only (STRATA_GATEWAY_ADMIN_PORT)")
    sub.add_parser("demo", help="run the demo against a running platform (strata up)").add_argument(
        "--home", type=Path, default=Path(os.environ.get("STRATA_HOME", ".strata")))

    models = sub.add_parser("models", help="registered models").add_subparsers(dest="action", required=True)
    mc = models.add_parser("create")
    mc.add_argument("name")
    mc.add_argument("--description", default="")
    mc.add_argument("--owner", default="")
    mc.add_argument("--tag", action="append", default=[], metavar="K=V")
    ml = models.add_parser("list")
    ml.add_argument("--query", default="")
    ml.add_argument("--owner", default="")
    ml.add_argument("--tag", action="append", default=[], metavar="K[=V]")
    models.add_parser("show").add_argument("name")

    versions = sub.add_parser("versions", help="model versions").add_subparsers(dest="action", required=True)
    versions.add_parser("list").add_argument("name", help="model name, or - for all models")
    vs = versions.add_parser("show")
    vs.add_argument("name")
    vs.add_argument("version", type=int)

    reg = sub.add_parser("register", help="register an .onnx file as a new version")
    reg.add_argument("name")
    reg.add_argument("file", type=Path)
    reg.add_argument("--create-model", action="store_true", help="create the model if it does not exist")
    reg.add_argument("--description", default="")
    reg.add_argument("--metric", action="append", default=[], metavar="K=V")
    reg.add_argument("--tag", action="append", default=[], metavar="K=V")
    reg.add_argument("--mlflow-run-id", default="")
    reg.add_argument("--dataset-hash", default="")
    reg.add_argument("--request-id", default="", help="makes a retried registration idempotent")
    reg.add_argument("--allow-nan", action="store_true",
                     help="the model takes NaN and infinities as inputs (refused otherwise)")

    alias = sub.add_parser("alias", help="aliases").add_subparsers(dest="action", required=True)
    a_set = alias.add_parser("set")
    a_set.add_argument("name")
    a_set.add_argument("alias")
    a_set.add_argument("version", type=int)
    a_del = alias.add_parser("delete")
    a_del.add_argument("name")
    a_del.add_argument("alias")

    promote = sub.add_parser("promote", help="promotion requests").add_subparsers(dest="action", required=True)
    pr = promote.add_parser("request")
    pr.add_argument("name")
    pr.add_argument("version", type=int)
    pr.add_argument("--alias", default="production")
    pr.add_argument("--reason", default="")
    for verb in ("approve", "reject"):
        p = promote.add_parser(verb)
        p.add_argument("promotion_id")
        p.add_argument("--comment", default="")
    promote.add_parser("list").add_argument("--name", default="")

    dl = sub.add_parser("download", help="download a version's artifact (sha256 verified)")
    dl.add_argument("name")
    dl.add_argument("version", type=int, nargs="?", default=0)
    dl.add_argument("--alias", default="")
    dl.add_argument("-o", "--output", type=Path, required=True)

    card = sub.add_parser("card", help="print a version's model card (Markdown)")
    card.add_argument("name")
    card.add_argument("version", type=int)

    sub.add_parser("audit", help="the audit log, newest first").add_argument("--resource-prefix", default="")

    inference_cli.add_commands(sub, ap)
    features_cli.add_commands(sub, ap)
    training_cli.add_commands(sub, ap)
    _add_monitor_commands(sub, ap)
    tok = sub.add_parser("token", help="mint a development HS256 token")
    tok.add_argument("--secret", default=os.environ.get("STRATA_JWT_SECRET"))
    tok.add_argument("--sub", required=True)
    tok.add_argument("--role", action="append", required=True,
                     choices=["viewer", "developer", "approver", "admin"])
    tok.add_argument("--ttl", type=int, default=3600, help="seconds")
    return ap


def run(args: argparse.Namespace) -> int:  # noqa: C901 - one branch per subcommand
    if args.cmd == "up":
        from services.launcher import run_platform
        return run_platform(home=args.home, demo=args.demo, auth=not args.no_auth, host=args.host,
                            gateway_port=args.gateway_port, admin_port=args.admin_port)
    if args.cmd == "demo":
        from services.demo import run_demo
        return run_demo(args.home)
    if args.cmd == "token":
        from services.common.auth import mint_token
        if not args.secret:
            raise SystemExit("error: --secret or STRATA_JWT_SECRET is required")
        print(mint_token(args.secret, args.sub, args.role, ttl_seconds=args.ttl))
        return 0

    if args.cmd in inference_cli.COMMANDS:
        return inference_cli.run(args)
    if args.cmd == "features":
        return features_cli.run(args)
    if args.cmd in training_cli.COMMANDS:
        return training_cli.run(args)
    if args.cmd == "monitor":
        return _monitor(args)
    out = args.json
    with RegistryClient(args.addr, args.token, args.tls_ca) as c:
        s = c.stub
        if args.cmd == "models" and args.action == "create":
            m = s.CreateRegisteredModel(pb.CreateRegisteredModelRequest(registered_model=pb.RegisteredModel(
                name=args.name, description=args.description, owner=args.owner,
                tags=parse_pairs(args.tag, "--tag")))).registered_model
            _print(m, out, _model_line)
        elif args.cmd == "models" and args.action == "list":
            _print(c.list_all_models(query=args.query, owner=args.owner, tags=args.tag), out, _model_line)
        elif args.cmd == "models" and args.action == "show":
            _print(s.GetRegisteredModel(pb.GetRegisteredModelRequest(name=args.name)).registered_model, out,
                   lambda m: f"{_model_line(m)}\n  {m.description}\n  tags {dict(m.tags)}")
        elif args.cmd == "versions" and args.action == "list":
            _print(c.list_all_versions(args.name), out, _version_line)
        elif args.cmd == "versions" and args.action == "show":
            _print(c.resolve(args.name, args.version), out, _version_detail)
        elif args.cmd == "register":
            lineage = pb.Lineage(mlflow_run_id=args.mlflow_run_id, dataset_hash=args.dataset_hash)
            v = c.register_onnx(args.name, args.file, create_model=args.create_model, description=args.description,
                                metrics=parse_pairs(args.metric, "--metric", float),
                                tags=parse_pairs(args.tag, "--tag"), lineage=lineage, request_id=args.request_id,
                                allow_nan=args.allow_nan)
            _print(v, out, _version_detail)
        elif args.cmd == "alias" and args.action == "set":
            r = s.SetModelAlias(pb.SetModelAliasRequest(name=args.name, alias=args.alias, version=args.version))
            _print(r.model_version, out, lambda v: f"{args.alias} -> v{v.version}"
                   f"{f' (was v{r.previous_version})' if r.previous_version else ''}")
        elif args.cmd == "alias" and args.action == "delete":
            s.DeleteModelAlias(pb.DeleteModelAliasRequest(name=args.name, alias=args.alias))
        elif args.cmd == "promote" and args.action == "request":
            p = s.RequestPromotion(pb.RequestPromotionRequest(
                name=args.name, version=args.version, alias=args.alias, reason=args.reason)).promotion
            _print(p, out, _promotion_line)
        elif args.cmd == "promote" and args.action in ("approve", "reject"):
            call = s.ApprovePromotion if args.action == "approve" else s.RejectPromotion
            req = (pb.ApprovePromotionRequest if args.action == "approve" else pb.RejectPromotionRequest)(
                promotion_id=args.promotion_id, comment=args.comment)
            _print(call(req).promotion, out, _promotion_line)
        elif args.cmd == "promote" and args.action == "list":
            _print(s.ListPromotions(pb.ListPromotionsRequest(name=args.name)).promotions, out, _promotion_line)
        elif args.cmd == "download":
            if bool(args.version) == bool(args.alias):
                raise SystemExit("error: give either VERSION or --alias")
            version = args.version or c.resolve(args.name, alias=args.alias).version
            v = c.download_artifact(args.name, version, args.output)
            print(f"{args.output}: {v.artifact.size_bytes:,} bytes, sha256 {v.artifact.sha256} verified")
        elif args.cmd == "card":
            print(s.GetModelCard(pb.GetModelCardRequest(name=args.name, version=args.version)).data.decode())
        elif args.cmd == "audit":
            events = s.ListAuditEvents(pb.ListAuditEventsRequest(resource_prefix=args.resource_prefix)).audit_events
            _print(events, out, lambda e: f"{e.time.ToJsonString()}  {e.principal:<12} {e.outcome:<18} "
                                          f"{e.method.rsplit('/', 1)[-1]:<28} {e.resource}")
    return 0


# -- strata monitor ------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """'90s', '30m', '6h', '7d', '2w', or several together ('1h30m')."""
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30m, 6h, 7d or 1h30m")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return timedelta(seconds=seconds)


def _add_monitor_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parent.add_argument("--monitoring-addr", default=peer_address("monitoring"),
                        help="monitoring service host:port (STRATA_MONITORING_ADDR, else 127.0.0.1:50055)")
    mon = sub.add_parser("monitor", help="drift, data quality and performance of served predictions")
    actions = mon.add_subparsers(dest="action", required=True)
    what = {"drift": "data and prediction drift against each version's reference",
            "quality": "missing values, out-of-range numbers, type mismatches, unseen categories",
            "performance": "metrics on the predictions whose ground truth has arrived",
            "report": "the drift report as a self-contained HTML page"}
    for action, help_text in what.items():
        p = actions.add_parser(action, help=help_text)
        p.add_argument("endpoint", nargs="?", default="", help="endpoint (or give --model and --version)")
        p.add_argument("--model", default="")
        p.add_argument("--version", type=int, default=0)
        p.add_argument("--since", type=parse_duration, default=None, metavar="DURATION",
                       help="window start before now: 30m, 6h, 7d (default: the service's, a day)")
        if action == "report":
            p.add_argument("--html", type=Path, required=True, metavar="FILE", help="where to write the page")
        else:
            p.add_argument("--json", dest="monitor_json", action="store_true", help="print JSON instead of tables")


def _monitor(args: argparse.Namespace) -> int:
    if bool(args.model) != bool(args.version):
        raise SystemExit("error: give --model and --version together")
    if not args.endpoint and not args.model:
        raise SystemExit("error: give an ENDPOINT, or --model and --version")
    start = datetime.now(UTC) - args.since if args.since else None
    target = {"endpoint": args.endpoint, "model": args.model, "version": args.version,
              "window": time_window(start)}
    with MonitoringClient(args.monitoring_addr, args.token, args.tls_ca) as c:
        if args.action == "report":
            page = c.drift_html(**target)
            args.html.write_text(page, encoding="utf-8")
            print(f"{args.html}: {len(page.encode()):,} bytes")
            return 0
        as_json = args.json or args.monitor_json
        if args.action == "drift":
            _print(c.drift(**target), as_json, _drift_table)
        elif args.action == "quality":
            _print(c.quality(**target), as_json, _quality_table)
        else:
            _print(c.performance(**target), as_json, _performance_table)
    return 0


def _window_line(w: mpb.TimeWindow) -> str:
    return f"window {w.start_time.ToJsonString()} .. {w.end_time.ToJsonString()}"


def _version_title(v: mpb.VersionDrift | mpb.VersionQuality | mpb.VersionPerformance) -> str:
    return f"models/{v.model}/versions/{v.version}{' (shadow)' if v.shadow else ''}  rows {v.rows:,}"


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def _kind(kind: int) -> str:
    return mpb.ColumnKind.Name(kind).removeprefix("COLUMN_KIND_").lower()


def _drift_table(r: mpb.GetDriftReportResponse) -> str:
    lines = [_window_line(r.window)]
    for v in r.versions:
        lines.append(f"{_version_title(v)}  drifted {v.drifted_features} of {len(v.features)} features "
                     f"({v.share_drifted:.0%})  dataset drift: {'yes' if v.dataset_drifted else 'no'}")
        rows = [[c.column, role, _kind(c.kind), mpb.DriftMethod.Name(c.method).removeprefix("DRIFT_METHOD_").lower(),
                 f"{c.score:.4g}", f"{c.threshold:g}", "DRIFT" if c.drifted else "no", f"{c.null_share:.1%}"]
                for role, cols in (("feature", v.features), ("output", v.predictions)) for c in cols]
        lines += _grid(["COLUMN", "ROLE", "KIND", "METHOD", "SCORE", "THRESHOLD", "DRIFTED", "NULLS"], rows)
        if v.missing_columns:
            lines.append(f"  missing from the window: {', '.join(v.missing_columns)}")
    return "\n".join(lines)


def _quality_table(r: mpb.GetDataQualityResponse) -> str:
    lines = [_window_line(r.window)]
    for v in r.versions:
        lines.append(_version_title(v))
        rows = []
        for role, cols in (("feature", v.features), ("output", v.predictions)):
            for c in cols:
                unseen = "-" if c.kind != mpb.COLUMN_KIND_CATEGORICAL else (
                    f"{c.unseen_rows:,} ({c.unseen_share:.1%})"
                    + (f" e.g. {', '.join(repr(x) for x in c.unseen_examples[:3])}" if c.unseen_examples else ""))
                out_of_range = "-" if c.kind != mpb.COLUMN_KIND_NUMERIC else \
                    f"{c.out_of_range:,} ({c.out_of_range_share:.1%})"
                rows.append([c.column, role, c.window_type, f"{c.null_share:.1%} ({c.reference_null_share:.1%})",
                             out_of_range, f"{c.type_mismatches:,}", unseen])
        lines += _grid(["COLUMN", "ROLE", "TYPE", "NULLS (REFERENCE)", "OUT OF RANGE", "TYPE MISMATCHES",
                        "UNSEEN CATEGORIES"], rows)
        if v.missing_columns:
            lines.append(f"  missing from the window: {', '.join(v.missing_columns)}")
        if v.extra_columns:
            lines.append(f"  not in the reference: {', '.join(v.extra_columns)}")
    return "\n".join(lines)


def _performance_table(r: mpb.GetPerformanceResponse) -> str:
    lines = [_window_line(r.window)]
    for v in r.versions:
        task = mpb.Task.Name(v.task).removeprefix("TASK_").lower()
        lines.append(f"{_version_title(v)}  labelled {v.labeled_rows:,} ({v.label_coverage:.0%})  {task}")
        kind = v.WhichOneof("metrics")
        if kind:
            m = getattr(v, kind)
            # Every double the message has (a metric of 0 included); an unset optional one is left out.
            values = [(f.name, getattr(m, f.name)) for f in m.DESCRIPTOR.fields
                      if f.type == f.TYPE_DOUBLE and (not f.has_presence or m.HasField(f.name))]
            lines.append("  " + "  ".join(f"{k} {x:.4g}" for k, x in values))
        if v.note:
            lines.append(f"  note: {v.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
