"""AutoML's ensemble: greedy selection on out-of-fold outputs, and the merged ONNX graph checked
against the native ensemble (binary, multiclass, regression)."""

from __future__ import annotations

import numpy as np
import pytest

from services.training import export, metrics
from services.training.ensemble import Candidate, EnsembleFamily, select
from services.training.types import Task


def test_selection_mixes_complementary_models_and_never_loses_to_the_best_single() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    truth = np.column_stack([1 - y, y]).astype(float)
    # Two models right on different halves of the rows, noisy elsewhere: their average beats both.
    noise_a, noise_b = rng.uniform(0, 1, 2000), rng.uniform(0, 1, 2000)
    half = np.arange(2000) < 1000
    a = np.where(half[:, None], truth * 0.8 + 0.1, np.column_stack([1 - noise_a, noise_a]))
    b = np.where(~half[:, None], truth * 0.8 + 0.1, np.column_stack([1 - noise_b, noise_b]))
    u = rng.uniform(0, 1, 2000)
    bad = np.column_stack([1 - u, u])
    classes = np.array([0, 1])
    cands = [Candidate("a", {}, a), Candidate("b", {}, b), Candidate("bad", {}, bad)]
    chosen = select(cands, "roc_auc", Task.CLASSIFICATION, y, classes)
    assert {c.family for c, _n in chosen} == {"a", "b"}
    mix = sum(n * c.oof for c, n in chosen) / sum(n for _c, n in chosen)
    singles = [metrics.score("roc_auc", Task.CLASSIFICATION, y, c.oof, classes) for c in cands]
    assert metrics.score("roc_auc", Task.CLASSIFICATION, y, mix, classes) > max(singles)
    # With only one useful candidate, it is chosen alone.
    alone = select([Candidate("a", {}, truth * 0.9 + 0.05), Candidate("bad", {}, bad)], "log_loss",
                   Task.CLASSIFICATION, y, classes)
    assert [(c.family, n) for c, n in alone] == [("a", 1)]


@pytest.mark.parametrize("dataset", ["breast_cancer", "iris", "diabetes"])
def test_the_merged_onnx_graph_matches_the_native_ensemble(dataset: str) -> None:
    from sklearn import datasets

    d = getattr(datasets, f"load_{dataset}")()
    task = Task.REGRESSION if dataset == "diabetes" else Task.CLASSIFICATION
    X, y = d.data.astype(np.float32), d.target
    fam = EnsembleFamily()
    params = {"members": [{"family": f, "params": {}, "weight": w}
                          for f, w in (("linear", 3), ("hist_gradient_boosting", 1), ("lightgbm", 2))]}
    model = fam.fit(fam.build(task, params, 0, 1), X, y, X[:1], lambda _s, _o: None)
    columns = [f"c{i}" for i in range(X.shape[1])]
    onx = export.with_column_inputs(fam.export(model, X.shape[1], task), columns, task,
                                    getattr(model, "classes_", None))
    parity = export.check_parity(onx.SerializeToString(), fam, model, X, columns, task, 1e-3)
    assert parity.passed and parity.label_agreement == 1.0, parity
    # The weights are the members' shares: 3/6, 1/6, 2/6.
    assert [round(w, 6) for _f, _m, w in model.members] == [0.5, round(1 / 6, 6), round(2 / 6, 6)]


def test_bad_members_are_value_errors() -> None:
    fam = EnsembleFamily()
    with pytest.raises(ValueError, match="members"):
        fam.build(Task.CLASSIFICATION, {"members": []}, 0, 1)
    with pytest.raises(ValueError, match="members"):
        fam.build(Task.CLASSIFICATION, {"members": [{"family": "linear", "params": {}, "weight": 1}], "x": 1}, 0, 1)
