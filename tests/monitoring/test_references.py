"""Reference profiles without gRPC: the model's columns as its signature names them, the columns a
table may hold, the stored profile read back giving the same drift as the one computed, a
replaced profile's file removed, and the lineage's errors blamed on the registry's data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.common.artifacts import LocalArtifactStore
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.paths import Confinement
from services.monitoring.app import MIGRATIONS
from services.monitoring.drift import ColumnKind, ReferenceProfile, drift_report
from services.monitoring.references import ReferenceStore, _deserialise, _serialise
from services.monitoring.rows import ModelColumns, column_values
from services.monitoring.types import ModelInfo, ReferenceRequest, Role, TensorSpec


class Catalog:
    def __init__(self, dataset_uri: str = "") -> None:
        self.dataset_uri = dataset_uri

    def describe(self, model: str, version: int) -> ModelInfo:
        if model != "m":
            raise NotFound(f"models/{model}/versions/{version} not found in the registry")
        return ModelInfo(model, version, (TensorSpec("age", (-1, 1)), TensorSpec("city", (-1,)),
                                          TensorSpec("emb", (-1, 2)), TensorSpec("img", (-1, 3, 3))),
                         (TensorSpec("label", (-1,)), TensorSpec("probabilities", (-1, -1))), self.dataset_uri)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReferenceStore]:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(MIGRATIONS)
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    yield ReferenceStore(db, artifacts, Confinement(str(artifacts.root)), Catalog())
    db.dispose()


def table(rng: np.random.Generator, n: int = 500, **extra: object) -> pa.Table:
    return pa.table({"age": rng.normal(40, 10, n), "city": rng.choice(["a", "b", "c"], n),
                     "emb[0]": rng.normal(size=n).astype(np.float32), "emb[1]": rng.normal(size=n),
                     "target": rng.integers(0, 2, n), **extra})


def write(store: ReferenceStore, key: str, t: pa.Table) -> None:
    path = Path(store.artifacts.root) / key  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path)


def test_the_models_columns_as_its_signature_names_them() -> None:
    cols = ModelColumns([("age", (-1, 1)), ("city", (-1,)), ("emb", (-1, 2)), ("any", (-1, -1)), ("img", (-1, 3, 3))])
    assert cols.names == ["age", "city", "emb[0]", "emb[1]"]
    assert "any[7]" in cols and "any" not in cols and "emb[2]" not in cols and "img" not in cols


def test_a_stored_profile_gives_the_drift_of_the_computed_one(store: ReferenceStore) -> None:
    rng = np.random.default_rng(1)
    t = table(rng, flag=rng.random(500) > 0.3)
    profile = ReferenceProfile.from_columns({n: column_values(t.column(n)) for n in ("age", "city", "emb[0]", "flag")})
    from services.monitoring.references import Profiles

    back = _deserialise(_serialise(Profiles(profile, ReferenceProfile.from_columns({"label": np.arange(500) % 3}))))
    current = table(rng, 300, flag=rng.random(300) > 0.5)
    window = {n: column_values(current.column(n)) for n in ("age", "city", "emb[0]", "flag")}
    assert drift_report(back.features, window) == drift_report(profile, window)
    assert back.features.columns["flag"].kind is ColumnKind.CATEGORICAL
    assert list(back.predictions.columns) == ["label"]  # type: ignore[union-attr]


def test_a_table_reference_profiles_the_models_columns(store: ReferenceStore) -> None:
    rng = np.random.default_rng(2)
    write(store, "refs/t.parquet", table(rng))
    ref = store.set(ReferenceRequest("m", 1, "refs/t.parquet", (), {"label": "target"}), "alice")
    assert [(c.name, c.source_column, c.role, c.kind) for c in ref.columns] == [
        ("age", "age", Role.FEATURE, ColumnKind.NUMERIC), ("city", "city", Role.FEATURE, ColumnKind.CATEGORICAL),
        ("emb[0]", "emb[0]", Role.FEATURE, ColumnKind.NUMERIC), ("emb[1]", "emb[1]", Role.FEATURE, ColumnKind.NUMERIC),
        ("label", "target", Role.PREDICTION, ColumnKind.NUMERIC)]
    assert store.get("m", 1) == ref
    first = store.profiles("m", 1)
    # Set again from other data: the profile is replaced, its old file removed.
    old = set((Path(store.artifacts.root) / "monitoring").rglob("*.npz"))  # type: ignore[attr-defined]
    write(store, "refs/u.parquet", table(rng, 200))
    assert store.set(ReferenceRequest("m", 1, "refs/u.parquet", ("age",), {}), "bob").rows == 200
    new = set((Path(store.artifacts.root) / "monitoring").rglob("*.npz"))  # type: ignore[attr-defined]
    assert len(old) == len(new) == 1 and old != new
    assert list(store.profiles("m", 1).features.columns) == ["age"] and store.profiles("m", 1) is not first


def test_columns_the_model_lacks_are_refused_by_name_and_nothing_is_stored(store: ReferenceStore) -> None:
    rng = np.random.default_rng(3)
    write(store, "refs/t.parquet", table(rng, customer_id=np.arange(500)))

    def field(**kw: object) -> str:
        req = {"model": "m", "version": 1, "table_uri": "refs/t.parquet", "columns": (), "prediction_columns": {},
               **kw}
        with pytest.raises(InvalidArgument) as e:
            store.set(ReferenceRequest(**req), "alice")  # type: ignore[arg-type]
        return e.value.field or ""

    assert field() == "table_uri"  # customer_id and target: neither inputs nor outputs
    assert field(columns=("age", "customer_id")) == "columns[1]"
    assert field(columns=("age", "nope")) == "columns[1]"
    assert field(columns=("target",), prediction_columns={"label": "target"}) == "columns"  # no feature
    assert field(columns=("age",), prediction_columns={"score": "target"}) == "prediction_columns['score']"
    assert field(columns=("age",), prediction_columns={"label": "nope"}) == "prediction_columns['label']"
    assert field(table_uri="refs/missing.parquet") == "table_uri"
    assert field(table_uri="../outside.parquet") == "table_uri"
    with pytest.raises(NotFound):
        store.set(ReferenceRequest("other", 1, "refs/t.parquet", (), {}), "alice")
    with pytest.raises(NotFound):
        store.get("m", 1)
    assert not list(Path(store.artifacts.root).rglob("*.npz"))  # type: ignore[attr-defined]


def test_the_lineage_training_set_gives_the_models_inputs_and_its_faults_are_the_registrys(
        store: ReferenceStore) -> None:
    rng = np.random.default_rng(4)
    write(store, "training-sets/ts.parquet", table(rng, entity=np.arange(500)))
    store.catalog = Catalog("training-sets/ts.parquet")
    ref = store.set(ReferenceRequest("m", 1, "", (), {}), "alice")
    assert ref.from_lineage and [c.name for c in ref.columns] == ["age", "city", "emb[0]", "emb[1]"]
    write(store, "training-sets/short.parquet", table(rng).drop_columns(["city"]))
    store.catalog = Catalog("training-sets/short.parquet")
    with pytest.raises(FailedPrecondition) as e:
        store.set(ReferenceRequest("m", 1, "", (), {}), "alice")
    assert e.value.field == "lineage.dataset_uri" and "'city'" in e.value.message
    store.catalog = Catalog("/etc/passwd")
    with pytest.raises(FailedPrecondition) as e:
        store.set(ReferenceRequest("m", 1, "", (), {}), "alice")
    assert e.value.field == "lineage.dataset_uri"
    store.catalog = Catalog("")
    with pytest.raises(FailedPrecondition) as e:
        store.set(ReferenceRequest("m", 1, "", (), {}), "alice")
    assert e.value.field == "table_uri"
    assert store.get("m", 1) == ref  # the failed attempts left the first reference as it was


def test_a_trained_models_one_input_tensor_takes_its_lineage_training_set_columns(tmp_path: Path) -> None:
    """A model from the training service takes its features as one [N, F] tensor ("input[j]");
    its lineage lists them ("{view}:{feature}", the training set's "{view}__{feature}") in order."""
    class TrainedCatalog:
        def describe(self, model: str, version: int) -> ModelInfo:
            return ModelInfo(model, version, (TensorSpec("input", (-1, 2)),), (TensorSpec("label", (-1,)),),
                             "training-sets/t.parquet", ("v:spend", "v:age"))

    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    db.migrate(MIGRATIONS)
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    refs = ReferenceStore(db, artifacts, Confinement(str(artifacts.root)), TrainedCatalog())
    rng = np.random.default_rng(9)
    write(refs, "training-sets/t.parquet", pa.table({"customer_id": np.arange(300), "v__spend": rng.normal(size=300),
                                                     "v__age": rng.normal(40, 5, 300), "target": rng.integers(0, 2, 300)}))
    ref = refs.set(ReferenceRequest("t", 1, "", (), {"label": "target"}), "alice")
    assert [(c.name, c.source_column, c.role) for c in ref.columns] == [
        ("input[0]", "v__spend", Role.FEATURE), ("input[1]", "v__age", Role.FEATURE),
        ("label", "target", Role.PREDICTION)]
    db.dispose()
