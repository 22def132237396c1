"""The search space as Optuna sees it: a trial's parameters from the spec's ParamSpecs
(conditional ones only when their parent took one of their values), and the sampler and pruner
the spec names."""

from __future__ import annotations

from typing import Any

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


def pruner(hpo: HpoSpec) -> optuna.pruners.BasePruner:
    if hpo.pruner == "none":
        return optuna.pruners.NopPruner()
    if hpo.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
