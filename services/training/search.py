"""The search space as Optuna sees it: a trial's parameters from the spec's ParamSpecs
(conditional ones only when their parent took one of their values), and the sampler and pruner
the spec names."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna

from services.training.types import HpoSpec, ParamSpec

SAMPLERS = ("tpe", "random", "cmaes", "grid")
PRUNERS = ("median", "hyperband", "none")


def suggest(trial: optuna.Trial, space: tuple[ParamSpec, ...], prefix: str = "") -> dict[str, Any]:
    """The parameters of one trial. `prefix` keeps families' parameters apart in one study
    (AutoML: `lightgbm.num_leaves`); the returned names are without it."""
    out: dict[str, Any] = {}
    for p in space:
        if p.parent and out.get(p.parent) not in p.parent_values:
            continue
        name = prefix + p.name
        if p.kind == "float":
            out[p.name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step or None)
        elif p.kind == "int":
            out[p.name] = trial.suggest_int(name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            out[p.name] = trial.suggest_categorical(name, list(p.choices))
    return out


def sampler(hpo: HpoSpec, seed: int) -> optuna.samplers.BaseSampler:
    if hpo.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if hpo.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if hpo.sampler == "grid":
        grid = {p.name: list(p.choices) for p in hpo.search_space}
        return optuna.samplers.GridSampler(grid, seed=seed)
    # multivariate + group: TPE that models conditional spaces jointly (AutoML's family choice)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


class FamilyMedianPruner(optuna.pruners.BasePruner):
    """AutoML's pruner: a trial is stopped when its intermediate value is worse than the median of
    earlier trials *of the same family* at the same step (a forest at 20 % of its trees and a
    boosted model after 10 rounds are not comparable), and never while it runs a family's defaults
    (the baselines every search starts from)."""

    def __init__(self, n_startup_trials: int = 3, n_warmup_steps: int = 1) -> None:
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.n_warmup_steps or trial.user_attrs.get("defaults"):
            return False
        family = trial.params.get("family")
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                        optuna.trial.TrialState.PRUNED))
        values = [t.intermediate_values[step] for t in done
                  if t.params.get("family") == family and step in t.intermediate_values]
        if len(values) < self.n_startup_trials:
            return False
        median = float(np.median(values))
        value = trial.intermediate_values[step]
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        return value < median if maximize else value > median


def pruner(hpo: HpoSpec, automl: bool = False) -> optuna.pruners.BasePruner:
    if hpo.pruner == "none":
        return optuna.pruners.NopPruner()
    if hpo.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if automl:
        return FamilyMedianPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
