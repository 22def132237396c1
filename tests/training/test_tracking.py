"""MLflow tracking on the embedded default (SQLite) and on the production backend (the real
PostgreSQL): a job's parent run and its trials' child runs, params, per-step metrics and
artifacts, read back with `mlflow.search_runs`; and several workers opening a new tracking
database at once (MLflow's migrations race) all get a working store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.training.tracking import PARENT_TAG, Tracker


def _mlflow_uri(database_url: str) -> str:
    # MLflow's SQLAlchemy store defaults to psycopg2 for postgresql://; the platform ships psycopg 3.
    return database_url.replace("postgresql://", "postgresql+psycopg://", 1)


def test_jobs_and_trials_are_runs_that_mlflow_reads_back(database_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = _mlflow_uri(database_url)
    tracker = Tracker(uri, str(tmp_path / "artifacts"))
    exp = tracker.experiment("tracking-test")
    assert tracker.experiment("tracking-test") == exp
    parent = tracker.start(exp, "job-1", {"strata.job_id": "job-1"})
    children = [tracker.start(exp, f"trial-{i}", {"strata.trial": str(i)}, parent=parent) for i in range(3)]
    for i, run in enumerate(children):
        tracker.log(run, params={"family": "linear", "C": 0.1 * (i + 1)}, metrics={"val_roc_auc": 0.9 + i / 100},
                    steps=[("val_roc_auc", 0.8 + s / 100, s) for s in range(5)])
        tracker.end(run)
    tracker.json_artifact(parent, "gate.json", {"passed": True})
    tracker.end(parent)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what a user's script points mlflow at
    found = mlflow.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'",
                               order_by=["metrics.val_roc_auc DESC"])
    assert list(found["tags.strata.trial"]) == ["2", "1", "0"]
    assert list(found["params.C"]) == ["0.30000000000000004", "0.2", "0.1"]
    history = tracker.client.get_metric_history(children[0], "val_roc_auc")
    assert sorted(m.step for m in history) == [0, 0, 1, 2, 3, 4]  # the final value at step 0 and the steps
    assert [a.path for a in tracker.client.list_artifacts(parent)] == ["gate.json"]


def test_workers_opening_a_new_tracking_database_together_all_succeed(database_url: str, tmp_path: Path) -> None:
    uri = _mlflow_uri(database_url)
    with ThreadPoolExecutor(4) as pool:
        trackers = list(pool.map(lambda _i: Tracker(uri, str(tmp_path / "artifacts")), range(4)))
    ids = {t.experiment("shared") for t in trackers}
    assert len(ids) == 1


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
