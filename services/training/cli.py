"""The `strata train` and `strata runs` subcommands (hooked into services/cli.py):

    strata train submit job.yaml [--request-id ID] [--watch]   a TrainingJobSpec in YAML (proto JSON names)
    strata train watch JOB          progress bar: trials done / total, pruned, best metric, ETA
    strata train list [--state RUNNING] | train show JOB | train cancel JOB
    strata train schedule create job.yaml --cron "0 3 * * 1" | schedule list | pause|resume|delete ID
    strata train schedule trigger ID --reason "drift on amount"   submit the stored job now
    strata runs search [--experiment ID] [--filter "metrics.val_roc_auc > 0.9"] [--order-by "metrics.x DESC"]
    strata runs compare RUN RUN ...   params and metrics side by side, differing keys marked

The training service's address comes from --training-addr or STRATA_TRAINING_ADDR (default
127.0.0.1:50053). A job file looks like:

    dataset: {table: {uri: data/train.parquet}, label_column: target}
    task: TASK_CLASSIFICATION
    trainer: {family: hist_gradient_boosting}
    hpo: {n_trials: 30, search_space: [{name: learning_rate, float_range: {low: 0.01, high: 0.3, log: true}}]}
    registration: {model_name: churn}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml
from google.protobuf import json_format
from strata.training.v1 import training_pb2 as pb
from strata.training.v1 import training_pb2_grpc

from services.common.client import open_channel
from services.common.settings import peer_address

COMMANDS = ("train", "runs")


def add_commands(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parent.add_argument("--training-addr", default=os.environ.get("STRATA_TRAINING_ADDR", peer_address("training")))
    tr = sub.add_parser("train", help="training jobs").add_subparsers(dest="action", required=True)
    sm = tr.add_parser("submit")
    sm.add_argument("file", type=Path)
    sm.add_argument("--request-id", default="")
    sm.add_argument("--watch", action="store_true", help="follow the job until it ends")
    tr.add_parser("watch").add_argument("job")
    ls = tr.add_parser("list")
    ls.add_argument("--state", default="", choices=["", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"])
    tr.add_parser("show").add_argument("job")
    tr.add_parser("cancel").add_argument("job")
    sch = tr.add_parser("schedule", help="cron schedules and retraining templates").add_subparsers(
        dest="schedule_action", required=True)
    mk = sch.add_parser("create")
    mk.add_argument("file", type=Path, help="the job spec (YAML), as for submit")
    mk.add_argument("--cron", default="", help="five fields, UTC ('0 3 * * 1'); none: only by trigger")
    mk.add_argument("--description", default="")
    sch.add_parser("list")
    for verb in ("pause", "resume", "delete"):
        sch.add_parser(verb).add_argument("schedule")
    trig = sch.add_parser("trigger")
    trig.add_argument("schedule")
    trig.add_argument("--reason", default="")
    trig.add_argument("--request-id", default="")
    runs = sub.add_parser("runs", help="MLflow runs of training jobs").add_subparsers(dest="action", required=True)
    se = runs.add_parser("search")
    se.add_argument("--experiment", action="append", default=[])
    se.add_argument("--filter", default="")
    se.add_argument("--order-by", action="append", default=[])
    se.add_argument("--limit", type=int, default=50)
    runs.add_parser("compare").add_argument("runs", nargs="+")


def _state(job: pb.TrainingJob) -> str:
    return pb.JobState.Name(job.state).removeprefix("JOB_STATE_")


def _line(job: pb.TrainingJob) -> str:
    r = job.result
    what = job.spec.trainer.family or "automl"
    out = f"{job.job_id}  {_state(job):<10} {job.spec.registration.model_name:<24} {what:<24}"
    if job.state == pb.JOB_STATE_SUCCEEDED:
        out += f" v{r.model_version}" if r.model_version else f" refused: {r.gate.reason}"
    elif job.error:
        out += f" {job.error[:120]}"
    return out


def _bar(job: pb.TrainingJob, width: int = 30) -> str:
    p = job.progress
    total = p.trials_total
    filled = int(width * p.trials_done / total) if total else 0
    best = f"best {p.best_value:.5g}" if p.HasField("best_value") else "best -"
    eta = f"ETA {p.eta_seconds:.0f}s" if p.eta_seconds else ""
    count = f"{p.trials_done}/{total} trials ({p.trials_pruned} pruned)" if total else ""
    return f"[{'#' * filled}{'.' * (width - filled)}] {count} {best} {eta} {p.stage:<10}"


def _watch(stub, job_id: str) -> pb.TrainingJob:
    job = None
    for update in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job_id)):
        job = update.job
        if sys.stdout.isatty():
            print("\r" + _bar(job), end="", flush=True)
        else:
            print(_bar(job), flush=True)
    print()
    return job


def _compare_table(resp: pb.CompareRunsResponse) -> str:
    ids = [r.run_id[:12] for r in resp.runs]
    width = max([len(row.key) for row in resp.rows] + [8])
    lines = [f"{'':<2}{'key':<{width}}  " + "  ".join(f"{i:>14}" for i in ids)]
    for row in resp.rows:
        cells = "  ".join(f"{_short(v):>14}" for v in row.values)
        lines.append(f"{'*' if row.differs else ' '} {row.key:<{width}}  {cells}")
    return "\n".join(lines)


def _short(v: str) -> str:
    try:
        return f"{float(v):.6g}"
    except ValueError:
        return v[:14]


def _schedule_line(s: pb.Schedule) -> str:
    when = s.next_run_time.ToJsonString() if s.HasField("next_run_time") else ("paused" if s.paused else "on trigger")
    return (f"{s.schedule_id}  {s.cron or '-':<16} next {when:<24} last job {s.last_job_id or '-':<16} "
            f"{s.spec.registration.model_name}  {s.description}")


def _schedule(stub, args: argparse.Namespace, show) -> None:
    a = args.schedule_action
    if a == "create":
        spec = json_format.ParseDict(yaml.safe_load(args.file.read_text()), pb.TrainingJobSpec())
        s = stub.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
            cron=args.cron, description=args.description, spec=spec))).schedule
        show(s) if args.json else print(_schedule_line(s))
    elif a == "list":
        for s in stub.ListSchedules(pb.ListSchedulesRequest(page_size=500)).schedules:
            show(s) if args.json else print(_schedule_line(s))
    elif a in ("pause", "resume"):
        s = stub.PauseSchedule(pb.PauseScheduleRequest(schedule_id=args.schedule, paused=a == "pause")).schedule
        print(_schedule_line(s))
    elif a == "delete":
        stub.DeleteSchedule(pb.DeleteScheduleRequest(schedule_id=args.schedule))
    elif a == "trigger":
        job = stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id=args.schedule, reason=args.reason,
                                                             request_id=args.request_id)).job
        print(job.job_id)


def run(args: argparse.Namespace) -> int:
    raw, channel = open_channel(args.training_addr, args.token, args.tls_ca)
    stub = training_pb2_grpc.TrainingServiceStub(channel)

    def show(msg) -> None:
        print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2))
    try:
        if args.cmd == "train" and args.action == "submit":
            spec = json_format.ParseDict(yaml.safe_load(args.file.read_text()), pb.TrainingJobSpec())
            job = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec, request_id=args.request_id)).job
            print(job.job_id if not args.json else json_format.MessageToJson(job))
            if args.watch:
                job = _watch(stub, job.job_id)
                print(_line(job))
                return 0 if job.state == pb.JOB_STATE_SUCCEEDED else 1
        elif args.cmd == "train" and args.action == "watch":
            job = _watch(stub, args.job)
            print(_line(job))
            return 0 if job.state == pb.JOB_STATE_SUCCEEDED else 1
        elif args.cmd == "train" and args.action == "list":
            state = pb.JobState.Value(f"JOB_STATE_{args.state}") if args.state else 0
            for job in stub.ListTrainingJobs(pb.ListTrainingJobsRequest(state=state, page_size=500)).jobs:
                show(job) if args.json else print(_line(job))
        elif args.cmd == "train" and args.action == "show":
            show(stub.GetTrainingJob(pb.GetTrainingJobRequest(job_id=args.job)).job)
        elif args.cmd == "train" and args.action == "cancel":
            print(_line(stub.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id=args.job)).job))
        elif args.cmd == "train" and args.action == "schedule":
            _schedule(stub, args, show)
        elif args.cmd == "runs" and args.action == "search":
            resp = stub.SearchRuns(pb.SearchRunsRequest(experiment_ids=args.experiment, filter=args.filter,
                                                        order_by=args.order_by, page_size=args.limit))
            for r in resp.runs:
                if args.json:
                    show(r)
                    continue
                metrics = ", ".join(f"{k}={v:.5g}" for k, v in sorted(r.metrics.items())[:4])
                print(f"{r.run_id}  {r.status:<9} {r.run_name:<14} {metrics}")
        elif args.cmd == "runs" and args.action == "compare":
            resp = stub.CompareRuns(pb.CompareRunsRequest(run_ids=args.runs))
            show(resp) if args.json else print(_compare_table(resp))
    finally:
        raw.close()
    return 0
