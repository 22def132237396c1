"""Spec checks name the field of the request; every trainer family exports to ONNX with parity
(classification and regression, on bundled scikit-learn data), with one input per column."""

from __future__ import annotations

import dataclasses
import io

import joblib
import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.training import export, spec
from services.training.trainers import FAMILIES
from services.training.types import (
    AutoMLSpec,
    DatasetSpec,
    HpoSpec,
    JobSpec,
    ParamSpec,
    Split,
    Task,
    ValidationSpec,
)

BASE = JobSpec(dataset=DatasetSpec(label_column="y", table_uri="t.parquet"), task=Task.CLASSIFICATION,
               model_name="m", family="linear")


@pytest.mark.parametrize(("change", "field"), [
    (dict(dataset=DatasetSpec(label_column="")), "spec.dataset.label_column"),
    (dict(dataset=DatasetSpec(label_column="y")), "spec.dataset"),
    (dict(dataset=DatasetSpec(label_column="y", feature_set="s")), "spec.dataset.features.entity_table_uri"),
    (dict(task=Task.UNSPECIFIED), "spec.task"),
    (dict(family="svm"), "spec.trainer.family"),
    (dict(family="", automl=None), "spec.trainer.family"),
    (dict(params={"nope": 1}), "spec.trainer.params"),
    (dict(automl=AutoMLSpec(("linear",), 10)), "spec.trainer"),
    (dict(family="", automl=AutoMLSpec(("svm",), 10)), "spec.automl.families[0]"),
    (dict(family="", automl=AutoMLSpec((), -1)), "spec.automl.time_budget_seconds"),
    (dict(hpo=HpoSpec((ParamSpec("C", "float", low=2, high=1),), n_trials=3)),
     "spec.hpo.search_space[0].float_range.high"),
    (dict(hpo=HpoSpec((ParamSpec("C", "float", low=0, high=1, log=True),), n_trials=3)),
     "spec.hpo.search_space[0].float_range.low"),
    (dict(hpo=HpoSpec((ParamSpec("C", "categorical"),), n_trials=3)), "spec.hpo.search_space[0].categorical.choices"),
    (dict(hpo=HpoSpec((ParamSpec("C", ""),), n_trials=3)), "spec.hpo.search_space[0]"),
    (dict(hpo=HpoSpec((ParamSpec("C", "float", low=1, high=2, parent="D", parent_values=(1,)),), n_trials=3)),
     "spec.hpo.search_space[0].condition.parent"),
    (dict(hpo=HpoSpec((ParamSpec("C", "float", low=1, high=2),), n_trials=0)), "spec.hpo.n_trials"),
    (dict(hpo=HpoSpec((ParamSpec("C", "float", low=1, high=2),), n_trials=3, sampler="bayes")), "spec.hpo.sampler"),
    (dict(validation=ValidationSpec(metric="rmse")), "spec.validation.metric"),
    (dict(validation=ValidationSpec(holdout_fraction=0.95)), "spec.validation.holdout_fraction"),
    (dict(validation=ValidationSpec(split=Split.TIME)), "spec.validation.time_column"),
    (dict(validation=ValidationSpec(floors={"rmse": 1.0})), "spec.validation.floors[rmse]"),
    (dict(model_name="bad name"), "spec.registration.model_name"),
    (dict(alias="production"), "spec.registration.alias"),
])
def test_bad_spec_names_the_field(change: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        spec.check(dataclasses.replace(BASE, **change))
    assert e.value.field == field


def test_defaults_are_filled_in() -> None:
    s = spec.check(BASE)
    assert (s.validation.metric, s.alias, s.validation.champion_alias, s.experiment) == \
        ("roc_auc", "challenger", "production", "m")
    assert spec.check(dataclasses.replace(BASE, task=Task.REGRESSION)).validation.metric == "rmse"


def _data(task: Task) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer, load_diabetes

    X, y = (load_breast_cancer if task == Task.CLASSIFICATION else load_diabetes)(return_X_y=True)
    return X.astype(np.float32), y


@pytest.mark.parametrize("task", [Task.CLASSIFICATION, Task.REGRESSION])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_with_parity(family: str, task: Task) -> None:
    X, y = _data(task)
    fam = FAMILIES[family]
    steps = []
    model = fam.fit(fam.build(task, {}, 0, 1), X, y, X[:50], lambda step, out: steps.append((step, out.shape)))
    assert steps and all(shape[0] == 50 for _, shape in steps)  # intermediate reports on the validation rows
    columns = [f"f{i}" for i in range(X.shape[1])]
    onnx_model = export.with_column_inputs(fam.export(model, X.shape[1], task), columns, task,
                                           getattr(model, "classes_", None))
    data = onnx_model.SerializeToString()
    parity = export.check_parity(data, fam, model, X, columns, task, 1e-4)
    print(f"\n{family} {task.name.lower()}: max |onnx - native| = {parity.max_abs_diff:.3g}, "
          f"labels agree {parity.label_agreement:.0%}")
    assert parity.passed and parity.rows == len(X)
    sess = export.session(data)
    assert [i.name for i in sess.get_inputs()] == columns and sess.get_inputs()[0].shape == [None, 1]
    # The native model is kept as a run artifact (joblib): it must come back the same.
    buf = io.BytesIO()
    joblib.dump(model, buf)
    buf.seek(0)
    again = joblib.load(buf)
    assert np.array_equal(fam.output(again, X[:20], task), fam.output(model, X[:20], task))


def test_parity_fails_when_the_export_differs() -> None:
    X, y = _data(Task.CLASSIFICATION)
    fam = FAMILIES["linear"]
    model = fam.fit(fam.build(Task.CLASSIFICATION, {}, 0, 1), X, y, X[:5], lambda s, o: None)
    other = fam.fit(fam.build(Task.CLASSIFICATION, {"C": 1e-4}, 0, 1), X, y, X[:5], lambda s, o: None)
    columns = [f"f{i}" for i in range(X.shape[1])]
    data = export.with_column_inputs(fam.export(other, X.shape[1], Task.CLASSIFICATION), columns,
                                     Task.CLASSIFICATION, other.classes_).SerializeToString()
    parity = export.check_parity(data, fam, model, X, columns, Task.CLASSIFICATION, 1e-4)
    assert not parity.passed and parity.max_abs_diff > 1e-2
