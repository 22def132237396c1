"""The training domain's plain types: what a job asks for (JobSpec and its parts), where it is
(JobState, Progress) and what it produced (Result). No protobuf: convert.py maps these to and
from strata.training.v1 beside the servicer. Every type is JSON-able through `asdict` and
`from_dict`, which is how a job is stored."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class Task(enum.IntEnum):
    UNSPECIFIED = 0
    CLASSIFICATION = 1
    REGRESSION = 2


class Split(enum.IntEnum):
    UNSPECIFIED = 0
    RANDOM = 1
    STRATIFIED = 2
    TIME = 3


class JobState(enum.IntEnum):
    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class DatasetSpec:
    label_column: str
    table_uri: str = ""                   # a Parquet table on the artifact store, or
    feature_set: str = ""                 # a training set built from the feature store
    features: tuple[str, ...] = ()
    entity_table_uri: str = ""
    timestamp_column: str = ""
    exclude_columns: tuple[str, ...] = ()

    @property
    def from_features(self) -> bool:
        return bool(self.feature_set or self.features)


@dataclass(frozen=True)
class ParamSpec:
    """One search dimension: kind "float", "int" or "categorical"."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float = 0.0
    choices: tuple[Any, ...] = ()
    parent: str = ""                      # sampled only when `parent` took one of `parent_values`
    parent_values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class HpoSpec:
    search_space: tuple[ParamSpec, ...] = ()
    n_trials: int = 0
    timeout_seconds: float = 0.0
    sampler: str = "tpe"
    pruner: str = "median"
    parallelism: int = 1


@dataclass(frozen=True)
class AutoMLSpec:
    families: tuple[str, ...] = ()
    time_budget_seconds: float = 0.0


@dataclass(frozen=True)
class ValidationSpec:
    split: Split = Split.UNSPECIFIED
    holdout_fraction: float = 0.2
    time_column: str = ""
    metric: str = ""
    min_improvement: float = 0.0
    floors: dict[str, float] = field(default_factory=dict)
    champion_alias: str = "production"
    seed: int = 0
    parity_tolerance: float = 1e-3


@dataclass(frozen=True)
class JobSpec:
    dataset: DatasetSpec
    task: Task
    model_name: str
    family: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    hpo: HpoSpec | None = None
    automl: AutoMLSpec | None = None
    validation: ValidationSpec = field(default_factory=ValidationSpec)
    alias: str = "challenger"
    experiment: str = ""
    #: What submitted it, when not a user directly ("schedule:<id>", "trigger:<id>: <reason>"); the
    #: MLflow run's tag strata.origin.
    origin: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        hpo = d.get("hpo")
        automl = d.get("automl")
        v = dict(d["validation"])
        v["split"] = Split(v["split"])
        return cls(
            dataset=DatasetSpec(**{k: tuple(x) if isinstance(x, list) else x for k, x in d["dataset"].items()}),
            task=Task(d["task"]), model_name=d["model_name"], family=d["family"], params=d["params"],
            hpo=HpoSpec(**{**hpo, "search_space": tuple(ParamSpec(**{k: tuple(x) if isinstance(x, list) else x
                                                                     for k, x in p.items()})
                                                          for p in hpo["search_space"])}) if hpo else None,
            automl=AutoMLSpec(**{**automl, "families": tuple(automl["families"])}) if automl else None,
            validation=ValidationSpec(**v), alias=d["alias"], experiment=d["experiment"], origin=d.get("origin", ""))


@dataclass
class Progress:
    trials_total: int = 0
    trials_done: int = 0
    trials_pruned: int = 0
    trials_failed: int = 0
    best_value: float | None = None
    eta_seconds: float = 0.0
    stage: str = ""


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    tolerance: float
    label_agreement: float
    rows: int
    passed: bool


@dataclass(frozen=True)
class Gate:
    passed: bool
    metric: str
    candidate_score: float
    champion_score: float | None
    champion_version: int
    reason: str


@dataclass(frozen=True)
class LeaderboardEntry:
    family: str
    best_value: float
    trials: int
    run_id: str


@dataclass
class Result:
    mlflow_run_id: str = ""
    experiment_id: str = ""
    family: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    parity: Parity | None = None
    gate: Gate | None = None
    model_name: str = ""
    model_version: int = 0
    dataset_hash: str = ""
    feature_views: list[str] = field(default_factory=list)
    leaderboard: list[LeaderboardEntry] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        d = dict(d)
        d["parity"] = Parity(**d["parity"]) if d.get("parity") else None
        d["gate"] = Gate(**d["gate"]) if d.get("gate") else None
        d["leaderboard"] = [LeaderboardEntry(**e) for e in d.get("leaderboard", [])]
        return cls(**d)


@dataclass
class Schedule:
    schedule_id: str
    description: str
    cron: str                             # "" : only when triggered
    spec: JobSpec
    paused: bool
    next_run_time: Any                    # datetime (UTC) or None
    last_run_time: Any
    last_job_id: str
    created_by: str
    create_time: Any


@dataclass
class Job:
    job_id: str
    spec: JobSpec
    state: JobState
    progress: Progress
    result: Result | None
    error: str
    created_by: str
    create_time: Any                      # datetime (UTC)
    start_time: Any = None
    end_time: Any = None
    attempts: int = 0
    cancel_requested: bool = False
