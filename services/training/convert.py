"""strata.training.v1 <-> the domain's plain types (types.py, dataplane.py), beside the servicer.

Parameters travel as google.protobuf.Struct, whose numbers are all doubles: a whole number comes
back as an int (`n_estimators: 100`, not 100.0), which is what every trainer expects."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2
from strata.training.v1 import training_pb2 as pb

from services.common.convert import timestamp_pb
from services.common.errors import InvalidArgument
from services.training.dataplane import Comparison, Experiment, RunView
from services.training.types import (
    AutoMLSpec,
    DatasetSpec,
    HpoSpec,
    Job,
    JobSpec,
    JobState,
    ParamSpec,
    Progress,
    Result,
    Schedule,
    Split,
    Task,
    ValidationSpec,
)

_KIND = {"float_range": "float", "int_range": "int", "categorical": "categorical"}


def _enum(cls: type, value: int, field: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise InvalidArgument(field, f"{value} is not a {cls.__name__} value") from None


def _plain(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _values(values) -> tuple:
    return tuple(_plain(json_format.MessageToDict(v)) for v in values)


def _param(p: pb.Param) -> ParamSpec:
    kind = p.WhichOneof("distribution")
    cond = dict(parent=p.condition.parent, parent_values=_values(p.condition.values)) if p.HasField("condition") else {}
    if kind == "float_range":
        r = p.float_range
        return ParamSpec(p.name, "float", low=r.low, high=r.high, log=r.log, step=r.step, **cond)
    if kind == "int_range":
        r = p.int_range
        return ParamSpec(p.name, "int", low=r.low, high=r.high, log=r.log, step=r.step, **cond)
    if kind == "categorical":
        return ParamSpec(p.name, "categorical", choices=_values(p.categorical.choices), **cond)
    return ParamSpec(p.name, "", **cond)  # spec.check names the missing distribution


def spec_from_pb(s: pb.TrainingJobSpec) -> JobSpec:
    d = s.dataset
    source = d.WhichOneof("source")
    f = d.features
    dataset = DatasetSpec(label_column=d.label_column, table_uri=d.table.uri if source == "table" else "",
                          feature_set=f.feature_set, features=tuple(f.features), entity_table_uri=f.entity_table_uri,
                          timestamp_column=f.timestamp_column, exclude_columns=tuple(d.exclude_columns))
    hpo = None
    if s.HasField("hpo"):
        h = s.hpo
        hpo = HpoSpec(search_space=tuple(_param(p) for p in h.search_space), n_trials=h.n_trials,
                      timeout_seconds=h.timeout_seconds, sampler=h.sampler, pruner=h.pruner, parallelism=h.parallelism)
    automl = AutoMLSpec(tuple(s.automl.families), s.automl.time_budget_seconds) if s.HasField("automl") else None
    v = s.validation
    validation = ValidationSpec(split=_enum(Split, v.split, "spec.validation.split"), holdout_fraction=v.holdout_fraction or 0.2,
                                time_column=v.time_column, metric=v.metric, min_improvement=v.min_improvement,
                                floors=dict(v.floors), champion_alias=v.champion_alias, seed=v.seed,
                                parity_tolerance=v.parity_tolerance)
    return JobSpec(dataset=dataset, task=_enum(Task, s.task, "spec.task"),
                   model_name=s.registration.model_name, family=s.trainer.family,
                   params=_plain(json_format.MessageToDict(s.trainer.params)), hpo=hpo, automl=automl,
                   validation=validation, alias=s.registration.alias, experiment=s.experiment)


def state_from_pb(state: int) -> JobState | None:
    """A list's state filter: unset is every state."""
    return _enum(JobState, state, "state") if state else None


def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(d)
    return out


def _value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(x, v)
    return v


def spec_pb(s: JobSpec) -> pb.TrainingJobSpec:
    ds = s.dataset
    dataset = pb.Dataset(label_column=ds.label_column, exclude_columns=ds.exclude_columns)
    if ds.from_features:
        dataset.features.CopyFrom(pb.FeatureDataset(feature_set=ds.feature_set, features=ds.features,
                                                    entity_table_uri=ds.entity_table_uri,
                                                    timestamp_column=ds.timestamp_column))
    else:
        dataset.table.uri = ds.table_uri
    out = pb.TrainingJobSpec(dataset=dataset, task=int(s.task), experiment=s.experiment,
                             trainer=pb.Trainer(family=s.family, params=_struct(s.params)),
                             registration=pb.Registration(model_name=s.model_name, alias=s.alias))
    if s.hpo is not None:
        h = s.hpo
        params = []
        for p in h.search_space:
            cond = pb.Condition(parent=p.parent, values=[_value(x) for x in p.parent_values]) if p.parent else None
            if p.kind == "float":
                params.append(pb.Param(name=p.name, float_range=pb.FloatRange(low=p.low, high=p.high, log=p.log,
                                                                             step=p.step), condition=cond))
            elif p.kind == "int":
                params.append(pb.Param(name=p.name, int_range=pb.IntRange(low=int(p.low), high=int(p.high), log=p.log,
                                                                         step=int(p.step)), condition=cond))
            else:
                params.append(pb.Param(name=p.name, categorical=pb.Categorical(choices=[_value(x) for x in p.choices]),
                                       condition=cond))
        out.hpo.CopyFrom(pb.Hpo(search_space=params, n_trials=h.n_trials, timeout_seconds=h.timeout_seconds,
                                sampler=h.sampler, pruner=h.pruner, parallelism=h.parallelism))
    if s.automl is not None:
        out.automl.CopyFrom(pb.AutoML(families=s.automl.families, time_budget_seconds=s.automl.time_budget_seconds))
    v = s.validation
    out.validation.CopyFrom(pb.Validation(split=int(v.split), holdout_fraction=v.holdout_fraction,
                                          time_column=v.time_column, metric=v.metric,
                                          min_improvement=v.min_improvement, floors=v.floors,
                                          champion_alias=v.champion_alias, seed=v.seed,
                                          parity_tolerance=v.parity_tolerance))
    return out


def _progress_pb(p: Progress) -> pb.Progress:
    out = pb.Progress(trials_total=p.trials_total, trials_done=p.trials_done, trials_pruned=p.trials_pruned,
                      trials_failed=p.trials_failed, eta_seconds=p.eta_seconds, stage=p.stage)
    if p.best_value is not None:
        out.best_value = p.best_value
    return out


def _result_pb(r: Result) -> pb.TrainingResult:
    out = pb.TrainingResult(mlflow_run_id=r.mlflow_run_id, experiment_id=r.experiment_id, family=r.family,
                            params=_struct(r.params), metrics={k: v for k, v in r.metrics.items() if v == v},
                            model_name=r.model_name, model_version=r.model_version, dataset_hash=r.dataset_hash,
                            feature_views=r.feature_views,
                            leaderboard=[pb.LeaderboardEntry(family=e.family, best_value=e.best_value,
                                                             trials=e.trials, run_id=e.run_id) for e in r.leaderboard])
    if r.parity is not None:
        p = r.parity
        out.parity.CopyFrom(pb.ParityReport(max_abs_diff=p.max_abs_diff, tolerance=p.tolerance,
                                            label_agreement=p.label_agreement, rows=p.rows, passed=p.passed))
    if r.gate is not None:
        g = r.gate
        out.gate.CopyFrom(pb.GateDecision(passed=g.passed, metric=g.metric, candidate_score=g.candidate_score,
                                          champion_version=g.champion_version, reason=g.reason))
        if g.champion_score is not None:
            out.gate.champion_score = g.champion_score
    return out


def job_pb(j: Job) -> pb.TrainingJob:
    out = pb.TrainingJob(job_id=j.job_id, spec=spec_pb(j.spec), state=int(j.state), progress=_progress_pb(j.progress),
                         error=j.error, created_by=j.created_by, create_time=timestamp_pb(j.create_time),
                         attempts=j.attempts)
    if j.result is not None:
        out.result.CopyFrom(_result_pb(j.result))
    if j.start_time is not None:
        out.start_time.CopyFrom(timestamp_pb(j.start_time))
    if j.end_time is not None:
        out.end_time.CopyFrom(timestamp_pb(j.end_time))
    return out


def experiment_pb(e: Experiment) -> pb.Experiment:
    return pb.Experiment(experiment_id=e.experiment_id, name=e.name, artifact_location=e.artifact_location)


def run_pb(r: RunView) -> pb.Run:
    out = pb.Run(run_id=r.run_id, experiment_id=r.experiment_id, run_name=r.run_name, status=r.status,
                 parent_run_id=r.parent_run_id, params=r.params, metrics={k: v for k, v in r.metrics.items() if v == v},
                 tags=r.tags, artifact_uri=r.artifact_uri)
    if r.start_time is not None:
        out.start_time.CopyFrom(timestamp_pb(r.start_time))
    if r.end_time is not None:
        out.end_time.CopyFrom(timestamp_pb(r.end_time))
    return out


def comparison_pb(c: Comparison) -> pb.CompareRunsResponse:
    return pb.CompareRunsResponse(runs=[run_pb(r) for r in c.runs], rows=[
        pb.ComparedValues(key=row.key, values=row.values, differs=row.differs) for row in c.rows])


def schedule_pb(s: Schedule) -> pb.Schedule:
    out = pb.Schedule(schedule_id=s.schedule_id, description=s.description, cron=s.cron, spec=spec_pb(s.spec),
                      paused=s.paused, last_job_id=s.last_job_id, created_by=s.created_by,
                      create_time=timestamp_pb(s.create_time))
    if s.next_run_time is not None:
        out.next_run_time.CopyFrom(timestamp_pb(s.next_run_time))
    if s.last_run_time is not None:
        out.last_run_time.CopyFrom(timestamp_pb(s.last_run_time))
    return out
