"""Experiment tracking is MLflow: a job is a parent run, each trial a child run (the
`mlflow.parentRunId` tag MLflow's UI nests by). The backend is the service's tracking URI
(SQLite under STRATA_HOME by default, PostgreSQL in production) and artifacts go to the artifact
store, so `mlflow ui`, `mlflow.search_runs` and MlflowClient see every job unchanged."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from services.common.db import sqlite_wal

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def _open_store(tracking_uri: str) -> tuple[MlflowClient, object]:
    """MLflow's store, its tables created or upgraded on first use. Worker processes starting
    together would each run MLflow's migrations on a new database, and all but one fail; on one
    host a lock file beside a SQLite database puts them in turn, and elsewhere (PostgreSQL) a
    failed attempt is retried once the winner has finished."""
    import fcntl

    lock = None
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///") + ".init-lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "w")  # noqa: SIM115 - released below
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        for attempt in range(10):
            try:
                client = MlflowClient(tracking_uri=tracking_uri)
                return client, client._tracking_client.store  # noqa: SLF001 - makes MLflow initialise now
            except Exception:
                if attempt == 9:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


class Tracker:
    def __init__(self, tracking_uri: str, artifact_root: str) -> None:
        self.uri = tracking_uri
        self.artifact_root = artifact_root.rstrip("/")
        self.client, store = _open_store(tracking_uri)
        if tracking_uri.startswith("sqlite") and getattr(store, "engine", None) is not None:
            sqlite_wal(store.engine)  # MLflow's SqlAlchemyStore; its UI server reads the same file

    def experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=f"{self.artifact_root}/{_safe(name)}")
        except MlflowException:  # created meanwhile by another worker
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start(self, experiment_id: str, name: str, tags: dict[str, str], parent: str = "") -> str:
        tags = {**tags, **({PARENT_TAG: parent} if parent else {})}
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def log(self, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
            steps: list[tuple[str, float, int]] | None = None, tags: dict[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if v == v]  # NaN is left out
        ms += [Metric(k, float(v), now, s) for k, v, s in (steps or []) if v == v]
        ps = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ms), 1), 1000):  # MLflow's batch limit
            self.client.log_batch(run_id, metrics=ms[i:i + 1000], params=ps if i == 0 else [],
                                  tags=ts if i == 0 else [])

    def artifact(self, run_id: str, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / name
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path))

    def json_artifact(self, run_id: str, name: str, value: Any) -> None:
        self.artifact(run_id, name, json.dumps(value, indent=2, default=str).encode())

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)



def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)[:128] or "default"
