"""The training service through the gateway: a job submitted, watched and inspected as REST/JSON
through a real Envoy with JWT auth (the registry, features and training processes behind it, the
worker registering with the service's own developer token)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gateway.config import render_envoy_config
from gateway.envoy import start_envoy, wait_ready, write_config
from services.common.auth import mint_token
from tests.processes import free_port, start_service, stop_process
from tests.training.conftest import breast_cancer

ROOT = Path(__file__).resolve().parents[2]
SECRET = "e2e-training-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def rest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    home = tmp_path_factory.mktemp("e2e-training")
    ports = {name: free_port() for name in ("registry", "features", "training")}
    env = {"STRATA_JWT_SECRET": SECRET, "STRATA_TRAINING_WORKERS": "1", "STRATA_TRAINING_POLL_SECONDS": "0.2",
           **{f"STRATA_{n.upper()}_ADDR": f"127.0.0.1:{p}" for n, p in ports.items()}}
    procs = []
    try:
        for name, port in ports.items():
            procs.append(start_service(name, home, port, env))
        gw_port, admin_port = free_port(), free_port()
        config = render_envoy_config(upstreams={n: f"127.0.0.1:{p}" for n, p in ports.items()},
                                     descriptor_path=ROOT / "gateway" / "strata.pb", jwt_secret=SECRET,
                                     listen_host="127.0.0.1", listen_port=gw_port, admin_port=admin_port)
        procs.append(start_envoy(write_config(config, home / "gateway"), home / "envoy.log"))
        wait_ready(admin_port, 20, process=procs[-1])
        yield f"http://127.0.0.1:{gw_port}", home
    finally:
        for p in reversed(procs):
            stop_process(p)


def _h(*roles: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, 'e2e-trainer', list(roles))}"}


def test_submit_watch_and_inspect_a_job_over_rest(rest: tuple[str, Path]) -> None:
    url, home = rest
    breast_cancer(home / "artifacts" / "data" / "bc.parquet")
    job = {"spec": {"dataset": {"table": {"uri": "data/bc.parquet"}, "label_column": "target"},
                    "task": "TASK_CLASSIFICATION", "trainer": {"family": "linear", "params": {"max_iter": 2000}},
                    "hpo": {"n_trials": 4, "search_space": [
                        {"name": "C", "float_range": {"low": 0.01, "high": 10, "log": True}}]},
                    "registration": {"model_name": "bc-rest"}}, "request_id": "rest-1"}
    r = requests.post(f"{url}/v1/training/jobs", headers=_h("viewer"), json=job)
    assert r.status_code == 403, r.text
    r = requests.post(f"{url}/v1/training/jobs", headers=_h("developer"), json=job)
    assert r.status_code == 200, r.text
    job_id = r.json()["job"]["job_id"]
    bad = {**job, "request_id": "rest-2"}
    bad["spec"] = {**job["spec"], "trainer": {"family": "svm"}}
    r = requests.post(f"{url}/v1/training/jobs", headers=_h("developer"), json=bad)
    assert r.status_code == 400 and "spec.trainer.family" in r.text, r.text
    deadline = time.monotonic() + 180
    while True:
        got = requests.get(f"{url}/v1/training/jobs/{job_id}", headers=_h("viewer")).json()["job"]
        if got["state"] in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got["state"] == "JOB_STATE_SUCCEEDED", got
    result = got["result"]
    assert result["model_name"] == "bc-rest" and result["model_version"] == 1 and result["parity"]["passed"]
    stream = requests.get(f"{url}/v1/training/jobs/{job_id}:watch", headers=_h("viewer"))
    assert stream.status_code == 200 and stream.json()[-1]["job"]["state"] == "JOB_STATE_SUCCEEDED"
    runs = requests.post(f"{url}/v1/training/runs:search", headers=_h("viewer"), json={
        "filter": f"tags.`mlflow.parentRunId` = '{result['mlflow_run_id']}'"}).json()["runs"]
    assert len(runs) == 4
    cmp = requests.post(f"{url}/v1/training/runs:compare", headers=_h("viewer"),
                        json={"run_ids": [runs[0]["run_id"], runs[1]["run_id"]]}).json()
    assert any(row["key"] == "params.C" and row["differs"] for row in cmp["rows"])
    # The version the worker registered, read back through the gateway: lineage names the job's run.
    mv = requests.get(f"{url}/v1/models/bc-rest/aliases/challenger", headers=_h("viewer")).json()["model_version"]
    assert mv["lineage"]["mlflow_run_id"] == result["mlflow_run_id"]
    assert mv["lineage"]["training_job_id"] == job_id
