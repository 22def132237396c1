"""Checks of a submitted JobSpec, with the defaults filled in: every problem is INVALID_ARGUMENT
naming the request field (`spec.hpo.search_space[2].float_range.high`), found before anything is
created."""

from __future__ import annotations

import dataclasses
import math

from services.common.errors import InvalidArgument, quote
from services.common.names import check_alias, check_name
from services.training.metrics import BY_TASK, DEFAULT
from services.training.search import PRUNERS, SAMPLERS
from services.training.trainers import FAMILIES
from services.training.types import JobSpec, ParamSpec, Split, Task

MAX_TRIALS = 10_000
MAX_SEARCH_PARAMS = 64
# Boosted trees compare float32 inputs with thresholds chosen in float64 (LightGBM, XGBoost): a row
# lying between the two moves one tree's leaf, a few 1e-4 of probability (0.00044 seen on 569 rows).
DEFAULT_PARITY_TOLERANCE = 1e-3
_DIST_FIELD = {"float": "float_range", "int": "int_range", "categorical": "categorical"}


def _finite(value: float, field: str) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(field, "must be a finite number")


def _check_space(space: tuple[ParamSpec, ...], field: str, grid: bool = False) -> None:
    if len(space) > MAX_SEARCH_PARAMS:
        raise InvalidArgument(field, f"at most {MAX_SEARCH_PARAMS} parameters")
    seen: set[str] = set()
    for i, p in enumerate(space):
        f = f"{field}[{i}]"
        if not p.name:
            raise InvalidArgument(f"{f}.name", "is required")
        if p.name in seen:
            raise InvalidArgument(f"{f}.name", f"parameter {quote(p.name)} is listed twice")
        if p.kind not in _DIST_FIELD:
            raise InvalidArgument(f, "give a distribution: float_range, int_range or categorical")
        d = f"{f}.{_DIST_FIELD[p.kind]}"
        if p.kind in ("float", "int"):
            _finite(p.low, f"{d}.low")
            _finite(p.high, f"{d}.high")
            if p.low > p.high:
                raise InvalidArgument(f"{d}.high", f"high {p.high:g} is below low {p.low:g}")
            if p.log and p.low <= (0 if p.kind == "float" else 0.5):
                raise InvalidArgument(f"{d}.low", "a log scale needs low > 0" + (" (>= 1 for integers)"
                                                                                   if p.kind == "int" else ""))
            if p.step < 0 or (p.log and p.step and p.kind == "float"):
                raise InvalidArgument(f"{d}.step", "must be positive, and not with log")
        elif not p.choices:
            raise InvalidArgument(f"{d}.choices", "at least one choice")
        if grid and p.kind != "categorical":
            raise InvalidArgument(d, "the grid sampler takes categorical parameters only")
        if p.parent and p.parent not in seen:
            raise InvalidArgument(f"{f}.condition.parent", f"{quote(p.parent)} is not a parameter declared before it")
        seen.add(p.name)


def check(spec: JobSpec) -> JobSpec:
    """The spec with defaults filled in, or INVALID_ARGUMENT naming the first bad field."""
    ds = spec.dataset
    if not ds.label_column:
        raise InvalidArgument("spec.dataset.label_column", "is required")
    if ds.from_features:
        if ds.table_uri:
            raise InvalidArgument("spec.dataset", "give a table or features, not both")
        if ds.feature_set and ds.features:
            raise InvalidArgument("spec.dataset.features.feature_set", "give feature_set or features, not both")
        if not ds.entity_table_uri:
            raise InvalidArgument("spec.dataset.features.entity_table_uri", "is required")
    elif not ds.table_uri:
        raise InvalidArgument("spec.dataset", "give a table (table.uri) or features (feature_set or features)")
    if spec.task not in (Task.CLASSIFICATION, Task.REGRESSION):
        raise InvalidArgument("spec.task", "must be TASK_CLASSIFICATION or TASK_REGRESSION")
    if spec.automl is not None:
        if spec.family:
            raise InvalidArgument("spec.trainer", "give a trainer or automl, not both")
        for i, fam in enumerate(spec.automl.families):
            if fam not in FAMILIES:
                raise InvalidArgument(f"spec.automl.families[{i}]", f"unknown family {quote(fam)}; families are "
                                      f"{sorted(FAMILIES)}")
        if not (spec.automl.time_budget_seconds > 0 and math.isfinite(spec.automl.time_budget_seconds)):
            raise InvalidArgument("spec.automl.time_budget_seconds", "must be a positive number of seconds")
    elif not spec.family:
        raise InvalidArgument("spec.trainer.family", f"is required (one of {sorted(FAMILIES)}), or give automl")
    elif spec.family not in FAMILIES:
        raise InvalidArgument("spec.trainer.family", f"unknown family {quote(spec.family)}; families are "
                              f"{sorted(FAMILIES)}")
    if spec.family:
        try:
            FAMILIES[spec.family].build(spec.task, dict(spec.params), 0, 1)
        except (ValueError, TypeError) as e:
            raise InvalidArgument("spec.trainer.params", quote(str(e), bare=True)) from None
    hpo = spec.hpo
    if hpo is not None:
        if not 1 <= hpo.n_trials <= MAX_TRIALS and not (spec.automl is not None and hpo.n_trials == 0):
            raise InvalidArgument("spec.hpo.n_trials", f"must be within 1..{MAX_TRIALS}")
        if hpo.timeout_seconds < 0 or not math.isfinite(hpo.timeout_seconds):
            raise InvalidArgument("spec.hpo.timeout_seconds", "must be zero (no limit) or positive")
        sampler = hpo.sampler or "tpe"
        if sampler not in SAMPLERS:
            raise InvalidArgument("spec.hpo.sampler", f"unknown sampler {quote(hpo.sampler)}; one of {list(SAMPLERS)}")
        pruner = hpo.pruner or "median"
        if pruner not in PRUNERS:
            raise InvalidArgument("spec.hpo.pruner", f"unknown pruner {quote(hpo.pruner)}; one of {list(PRUNERS)}")
        if not 0 <= hpo.parallelism <= 64:
            raise InvalidArgument("spec.hpo.parallelism", "must be within 1..64")
        if spec.automl is None and not hpo.search_space:
            raise InvalidArgument("spec.hpo.search_space", "an HPO block needs at least one parameter")
        _check_space(hpo.search_space, "spec.hpo.search_space", grid=sampler == "grid")
        hpo = dataclasses.replace(hpo, sampler=sampler, pruner=pruner, parallelism=hpo.parallelism or 1)
    v = spec.validation
    if not 0 < v.holdout_fraction <= 0.9:
        raise InvalidArgument("spec.validation.holdout_fraction", "must be within (0, 0.9]")
    metric = v.metric or DEFAULT[spec.task]
    if metric not in BY_TASK[spec.task]:
        raise InvalidArgument("spec.validation.metric", f"{quote(v.metric)} is not a {spec.task.name.lower()} metric; "
                              f"one of {list(BY_TASK[spec.task])}")
    for name, floor in v.floors.items():
        if name not in BY_TASK[spec.task]:
            raise InvalidArgument(f"spec.validation.floors[{quote(name, bare=True)}]", "unknown metric; one of "
                                  f"{list(BY_TASK[spec.task])}")
        _finite(floor, f"spec.validation.floors[{name}]")
    if v.split == Split.TIME and not v.time_column:
        raise InvalidArgument("spec.validation.time_column", "SPLIT_TIME needs the time column")
    if v.split == Split.STRATIFIED and spec.task != Task.CLASSIFICATION:
        raise InvalidArgument("spec.validation.split", "SPLIT_STRATIFIED is for classification")
    _finite(v.min_improvement, "spec.validation.min_improvement")
    if v.min_improvement < 0:
        raise InvalidArgument("spec.validation.min_improvement", "must not be negative")
    tolerance = v.parity_tolerance or DEFAULT_PARITY_TOLERANCE
    if tolerance < 0 or not math.isfinite(tolerance):
        raise InvalidArgument("spec.validation.parity_tolerance", "must be a positive number")
    champion = check_alias(v.champion_alias or "production", "spec.validation.champion_alias")
    check_name(spec.model_name, "spec.registration.model_name")
    alias = check_alias(spec.alias or "challenger", "spec.registration.alias")
    if alias == champion:
        raise InvalidArgument("spec.registration.alias", f"a candidate cannot take the champion's alias {alias!r}: "
                              "it gets there through the registry's approval")
    if len(spec.experiment) > 256:
        raise InvalidArgument("spec.experiment", "at most 256 characters")
    return dataclasses.replace(
        spec, hpo=hpo, alias=alias, experiment=spec.experiment or spec.model_name,
        validation=dataclasses.replace(v, metric=metric, parity_tolerance=tolerance, champion_alias=champion))

