"""The training service through gRPC, with real processes: registry, training and its worker,
MLflow's tracking store and Optuna's study in SQLite under STRATA_HOME, the bundled scikit-learn
datasets as Parquet tables on the artifact store."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from strata.registry.v1 import registry_pb2 as rpb
from strata.training.v1 import training_pb2 as pb

from tests.processes import free_port, stop_process
from tests.training.conftest import Platform, breast_cancer, diabetes

pytestmark = pytest.mark.e2e


def _table(uri: str, label: str = "target") -> pb.Dataset:
    return pb.Dataset(table=pb.TableDataset(uri=uri), label_column=label)


@contextmanager
def mlflow_server(db: Path) -> Iterator[str]:
    from services.common.health import wait_http
    from services.launcher import mlflow_ui

    port = free_port()
    child = mlflow_ui(db.parent, "127.0.0.1", port, db.parent / "mlflow-ui.log")
    child.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 90, child.proc, what="mlflow")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(child.proc)


def wait(stub, job_id: str, timeout: float = 240) -> pb.TrainingJob:
    deadline = time.monotonic() + timeout
    job = None
    for update in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job_id), timeout=timeout):
        job = update.job
        if time.monotonic() > deadline:
            break
    assert job is not None and job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
    return job


def test_hpo_job_tracks_prunes_exports_and_registers_with_lineage(platform: Platform) -> None:
    breast_cancer(platform.store / "data" / "bc.parquet")
    stub = platform.training()
    spec = pb.TrainingJobSpec(
        dataset=_table("data/bc.parquet"), task=pb.TASK_CLASSIFICATION,
        trainer=pb.Trainer(family="hist_gradient_boosting"),
        hpo=pb.Hpo(n_trials=20, pruner="median", search_space=[
            pb.Param(name="learning_rate", float_range=pb.FloatRange(low=0.001, high=0.5, log=True)),
            pb.Param(name="max_iter", int_range=pb.IntRange(low=10, high=80)),
            pb.Param(name="max_leaf_nodes", int_range=pb.IntRange(low=2, high=31))]),
        validation=pb.Validation(seed=7), registration=pb.Registration(model_name="bc-hpo"))
    submitted = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec, request_id="hpo-1")).job
    again = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec, request_id="hpo-1")).job
    assert again.job_id == submitted.job_id
    job = wait(stub, submitted.job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    p, r = job.progress, job.result
    assert p.trials_done == 20 and p.trials_pruned >= 1, p  # completed + pruned = n_trials exactly
    print(f"\ntrials done {p.trials_done}, pruned {p.trials_pruned}, best val roc_auc {p.best_value:.4f}; "
          f"held-out {dict(r.metrics)}; parity max |onnx - native| = {r.parity.max_abs_diff:.3g} "
          f"(tolerance {r.parity.tolerance:g}), labels agree {r.parity.label_agreement:.0%}")
    assert r.parity.passed and r.parity.rows > 0
    assert r.gate.passed and r.model_name == "bc-hpo" and r.model_version == 1
    # MLflow: the job's parent run and one child run per trial, as MLflow's own API sees them.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{platform.home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["bc-hpo"], output_format="list")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == r.mlflow_run_id]
    assert len(children) >= 20 and any(x.info.run_id == r.mlflow_run_id for x in runs)
    parent = mlflow.get_run(r.mlflow_run_id)
    assert parent.data.tags["strata.dataset_hash"] == r.dataset_hash and "holdout_roc_auc" in parent.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(r.mlflow_run_id)}
    assert {"model.onnx", "parity.json", "gate.json", "native_model.joblib", "confusion_matrix.png"} <= artifacts
    # The MLflow server `strata up` runs, on the same store: its REST API returns the same runs.
    import requests

    with mlflow_server(platform.home / "mlflow.db") as url:
        exp = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name",
                           params={"experiment_name": "bc-hpo"}).json()["experiment"]
        rest = requests.post(f"{url}/api/2.0/mlflow/runs/search", json={
            "experiment_ids": [exp["experiment_id"]], "max_results": 1000}).json()["runs"]
        assert {x["info"]["run_id"] for x in rest} == {x.info.run_id for x in runs}
        # ... and the UI's artifact browser lists the job's files (kept on the artifact store).
        listed = requests.get(f"{url}/api/2.0/mlflow/artifacts/list", params={"run_id": r.mlflow_run_id}).json()
        assert {"model.onnx", "confusion_matrix.png"} <= {f["path"] for f in listed["files"]}
    # The registered version: what inference serves, with its lineage and the challenger alias.
    reg = platform.registry()
    mv = reg.GetModelVersionByAlias(rpb.GetModelVersionByAliasRequest(name="bc-hpo", alias="challenger")).model_version
    assert mv.version == 1 and mv.lineage.dataset_hash == r.dataset_hash
    assert mv.lineage.mlflow_run_id == r.mlflow_run_id and mv.lineage.training_job_id == job.job_id
    assert [t.name for t in mv.signature.inputs][:2] == ["mean_radius", "mean_texture"]
    # Runs through the service: search with MLflow's syntax, compare side by side.
    found = stub.SearchRuns(pb.SearchRunsRequest(filter=f"tags.`mlflow.parentRunId` = '{r.mlflow_run_id}'",
                                                 order_by=["metrics.val_roc_auc DESC"], page_size=5))
    assert len(found.runs) == 5 and found.next_page_token
    values = [x.metrics["val_roc_auc"] for x in found.runs if "val_roc_auc" in x.metrics]
    assert values == sorted(values, reverse=True)
    nxt = stub.SearchRuns(pb.SearchRunsRequest(filter=f"tags.`mlflow.parentRunId` = '{r.mlflow_run_id}'",
                                               order_by=["metrics.val_roc_auc DESC"], page_size=5,
                                               page_token=found.next_page_token))
    assert not {x.run_id for x in nxt.runs} & {x.run_id for x in found.runs}
    cmp = stub.CompareRuns(pb.CompareRunsRequest(run_ids=[found.runs[0].run_id, found.runs[1].run_id]))
    rows = {row.key: row for row in cmp.rows}
    assert rows["params.learning_rate"].differs and len(rows["params.learning_rate"].values) == 2
    assert stub.GetRun(pb.GetRunRequest(run_id=r.mlflow_run_id)).run.tags["strata.job_id"] == job.job_id
    assert any(e.name == "bc-hpo" for e in stub.ListExperiments(pb.ListExperimentsRequest()).experiments)


def test_gate_admits_a_better_candidate_and_refuses_a_worse_one(platform: Platform) -> None:
    diabetes(platform.store / "data" / "diabetes.parquet")
    stub, reg = platform.training(), platform.registry()

    def submit(family: str, params: dict) -> pb.TrainingJob:
        spec = pb.TrainingJobSpec(dataset=_table("data/diabetes.parquet"), task=pb.TASK_REGRESSION,
                                  trainer=pb.Trainer(family=family), validation=pb.Validation(
                                      champion_alias="incumbent", seed=3, min_improvement=1.0),
                                  registration=pb.Registration(model_name="diabetes"))
        spec.trainer.params.update(params)
        return wait(stub, stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec)).job.job_id)

    weak = submit("linear", {"alpha": 1000.0})  # shrinks every coefficient to ~0: predicts the mean
    assert weak.state == pb.JOB_STATE_SUCCEEDED and weak.result.gate.passed and weak.result.model_version == 1
    reg.SetModelAlias(rpb.SetModelAliasRequest(name="diabetes", alias="incumbent", version=1))
    strong = submit("linear", {"alpha": 0.01})
    g = strong.result.gate
    assert g.passed and g.champion_version == 1 and g.candidate_score < g.champion_score - 1.0, g
    assert strong.result.model_version == 2
    reg.SetModelAlias(rpb.SetModelAliasRequest(name="diabetes", alias="incumbent", version=2))
    worse = submit("linear", {"alpha": 1000.0})
    g = worse.result.gate
    assert worse.state == pb.JOB_STATE_SUCCEEDED and not g.passed and g.champion_version == 2, g
    assert "does not beat" in g.reason and worse.result.model_version == 0
    versions = reg.ListModelVersions(rpb.ListModelVersionsRequest(name="diabetes")).model_versions
    assert sorted(v.version for v in versions) == [1, 2]  # the refused candidate was not registered


def _bad(stub, spec: pb.TrainingJobSpec) -> str:
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    return e.value.details()


def test_bad_specs_are_refused_naming_the_field_and_create_nothing(platform: Platform) -> None:
    breast_cancer(platform.store / "data" / "bc2.parquet")
    stub = platform.training()
    before = len(stub.ListTrainingJobs(pb.ListTrainingJobsRequest(page_size=500)).jobs)

    def spec(**kw) -> pb.TrainingJobSpec:
        base = dict(dataset=_table("data/bc2.parquet"), task=pb.TASK_CLASSIFICATION,
                    trainer=pb.Trainer(family="linear"), registration=pb.Registration(model_name="bad"))
        return pb.TrainingJobSpec(**{**base, **kw})

    assert "spec.dataset.label_column" in _bad(stub, spec(dataset=_table("data/bc2.parquet", "nope")))
    assert "spec.trainer.family" in _bad(stub, spec(trainer=pb.Trainer(family="svm")))
    assert "spec.hpo.search_space[0].float_range.high" in _bad(stub, spec(hpo=pb.Hpo(n_trials=5, search_space=[
        pb.Param(name="C", float_range=pb.FloatRange(low=2, high=1))])))
    assert "spec.hpo.search_space[0]" in _bad(stub, spec(hpo=pb.Hpo(n_trials=5, search_space=[pb.Param(name="C")])))
    assert "spec.automl.time_budget_seconds" in _bad(stub, spec(trainer=pb.Trainer(), automl=pb.AutoML(
        families=["linear"], time_budget_seconds=0)))
    assert "spec.task" in _bad(stub, spec(task=pb.TASK_UNSPECIFIED))
    assert "spec.dataset.table.uri" in _bad(stub, spec(dataset=_table("../../etc/passwd")))
    assert "spec.trainer.params" in _bad(stub, spec(trainer=pb.Trainer(
        family="linear", params={"fields": {"no_such": {"number_value": 1}}})))
    assert "spec.dataset.features" in _bad(stub, spec(dataset=pb.Dataset(
        features=pb.FeatureDataset(feature_set="nope", entity_table_uri="data/bc2.parquet"), label_column="target")))
    assert len(stub.ListTrainingJobs(pb.ListTrainingJobsRequest(page_size=500)).jobs) == before


def test_cancel_stops_a_running_job_within_seconds(platform: Platform) -> None:
    breast_cancer(platform.store / "data" / "bc3.parquet")
    stub = platform.training()
    spec = pb.TrainingJobSpec(
        dataset=_table("data/bc3.parquet"), task=pb.TASK_CLASSIFICATION, trainer=pb.Trainer(family="random_forest"),
        hpo=pb.Hpo(n_trials=500, pruner="none", search_space=[
            pb.Param(name="n_estimators", int_range=pb.IntRange(low=50, high=100))]),
        registration=pb.Registration(model_name="bc-cancel"))
    job = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec)).job
    for update in stub.WatchTrainingJob(pb.WatchTrainingJobRequest(job_id=job.job_id), timeout=120):
        if update.job.progress.trials_done >= 2:
            break
    asked = time.monotonic()
    assert stub.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id=job.job_id)).job.state == pb.JOB_STATE_RUNNING
    done = wait(stub, job.job_id, timeout=60)
    took = time.monotonic() - asked
    assert done.state == pb.JOB_STATE_CANCELLED and took < 15, (done.state, took)
    with pytest.raises(grpc.RpcError) as e:
        stub.CancelTrainingJob(pb.CancelTrainingJobRequest(job_id=job.job_id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_automl_searches_families_within_its_budget_with_a_leaderboard(platform: Platform) -> None:
    breast_cancer(platform.store / "data" / "bc-automl.parquet")
    stub = platform.training()
    families = ["linear", "random_forest", "hist_gradient_boosting", "lightgbm"]
    spec = pb.TrainingJobSpec(
        dataset=_table("data/bc-automl.parquet"), task=pb.TASK_CLASSIFICATION,
        automl=pb.AutoML(families=families, time_budget_seconds=15),
        registration=pb.Registration(model_name="bc-automl"))
    started = time.monotonic()
    job = wait(stub, stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec)).job.job_id)
    took = time.monotonic() - started
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    board = job.result.leaderboard
    print(f"\nAutoML 15 s: {job.progress.trials_done} trials in {took:.0f} s; leaderboard " +
          ", ".join(f"{e.family} {e.best_value:.4f} ({e.trials})" for e in board))
    singles = [e for e in board if e.family != "ensemble"]
    assert {e.family for e in singles} == set(families)  # every family ran, its defaults first
    assert singles == sorted(singles, key=lambda e: -e.best_value)
    # The final model: the ensemble selected on out-of-fold outputs when it beat the best single
    # family there (listed first, `trials` = its members), else that family.
    assert job.result.family == board[0].family
    if board[0].family == "ensemble":
        members = job.result.params["members"]
        assert len(members) == board[0].trials >= 2 and {m["family"] for m in members} <= set(families)
    else:
        assert board[0].best_value == max(e.best_value for e in board)
    assert job.result.parity.passed and job.result.model_version >= 1
    assert took < 15 + 60  # the budget stops the search; fit, export, gate and registration follow


def test_a_retraining_template_runs_when_triggered(platform: Platform) -> None:
    breast_cancer(platform.store / "data" / "bc-trigger.parquet")
    stub = platform.training()
    spec = pb.TrainingJobSpec(dataset=_table("data/bc-trigger.parquet"), task=pb.TASK_CLASSIFICATION,
                              trainer=pb.Trainer(family="linear"), registration=pb.Registration(model_name="bc-trig"))
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(cron="every day", spec=spec)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "schedule.cron" in e.value.details()
    assert not stub.ListSchedules(pb.ListSchedulesRequest()).schedules
    template = stub.CreateSchedule(pb.CreateScheduleRequest(schedule=pb.Schedule(
        description="retrain on drift", spec=spec))).schedule
    assert not template.HasField("next_run_time")
    job = stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id=template.schedule_id, reason="drift",
                                                         request_id="alert-1")).job
    again = stub.TriggerSchedule(pb.TriggerScheduleRequest(schedule_id=template.schedule_id, reason="drift",
                                                           request_id="alert-1")).job
    assert again.job_id == job.job_id
    done = wait(stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.result.model_version == 1, done.error
    run = stub.GetRun(pb.GetRunRequest(run_id=done.result.mlflow_run_id)).run
    assert run.tags["strata.origin"] == f"trigger:{template.schedule_id}: drift"
    listed = stub.ListSchedules(pb.ListSchedulesRequest()).schedules
    assert [s.last_job_id for s in listed] == [job.job_id]


def test_a_job_on_a_feature_set_trains_on_point_in_time_features_with_lineage(platform: Platform) -> None:
    """features -> training set -> job -> registered version naming the view versions and the set."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_breast_cancer
    from strata.common.v1 import types_pb2
    from strata.features.v1 import features_pb2 as fpb

    fs = platform.features()
    d = load_breast_cancer()
    n, names = len(d.target), ["mean_radius", "mean_texture", "mean_area", "worst_radius", "worst_concavity"]
    cols = [list(d.feature_names).index(x.replace("_", " ")) for x in names]
    us = pa.timestamp("us", tz="UTC")
    t0 = 1_767_225_600_000_000
    src = platform.store / "sources" / "tumours.parquet"
    src.parent.mkdir(parents=True, exist_ok=True)
    (platform.store / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"patient_id": pa.array(range(n), pa.int64()), "ts": pa.array([t0] * n, us),
                             **{name: d.data[:, c] for name, c in zip(names, cols, strict=True)}}), src)
    fs.ApplyEntity(fpb.ApplyEntityRequest(entity=fpb.Entity(name="patient", join_key="patient_id",
                                                             value_type=fpb.VALUE_TYPE_INT64)))
    fs.ApplyFeatureView(fpb.ApplyFeatureViewRequest(feature_view=fpb.FeatureView(
        name="tumour", entities=["patient"], source=fpb.DataSource(path="sources/tumours.parquet", timestamp_field="ts"),
        features=[fpb.Feature(name=x, dtype=types_pb2.DATA_TYPE_FLOAT64) for x in names])))
    fs.ApplyFeatureSet(fpb.ApplyFeatureSetRequest(feature_set=fpb.FeatureSet(
        name="tumour_v1", features=[f"tumour:{x}" for x in names])))
    (platform.store / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"patient_id": pa.array(range(n), pa.int64()),
                             "event_timestamp": pa.array([t0 + 1] * n, us), "target": d.target}),
                   platform.store / "data" / "patients.parquet")
    stub = platform.training()
    spec = pb.TrainingJobSpec(
        dataset=pb.Dataset(features=pb.FeatureDataset(feature_set="tumour_v1", entity_table_uri="data/patients.parquet",
                                                      timestamp_column="event_timestamp"), label_column="target"),
        task=pb.TASK_CLASSIFICATION, trainer=pb.Trainer(family="hist_gradient_boosting"),
        registration=pb.Registration(model_name="tumour"))
    job = wait(stub, stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(spec=spec)).job.job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert list(job.result.feature_views) == ["tumour:1"] and job.result.metrics["roc_auc"] > 0.9
    mv = platform.registry().GetModelVersion(rpb.GetModelVersionRequest(name="tumour", version=1)).model_version
    assert list(mv.lineage.feature_views) == ["tumour:1"] and mv.lineage.feature_set == "tumour_v1"
    assert mv.lineage.dataset_hash == job.result.dataset_hash and mv.lineage.dataset_uri.endswith(".parquet")
    # The model takes the training set's columns, in the feature set's order, and its lineage names
    # the features behind them: what serving by entity key reads.
    assert [i.name for i in mv.signature.inputs] == [f"tumour__{x}" for x in names]
    assert list(mv.lineage.features) == [f"tumour:{x}" for x in names]

    # Serving by entity key: the endpoint reads the same features online and predicts what the
    # model predicts on the same values sent as rows.
    from google.protobuf import struct_pb2
    from strata.inference.v1 import inference_pb2 as ipb

    from tests.inference.conftest import Registry, policy, start_inference

    for _ in fs.Materialize(fpb.MaterializeRequest(view="tumour")):
        pass
    srv = start_inference(Registry(platform.registry_addr, {}), platform.home / "inference",
                          STRATA_FEATURES_ADDR=platform.env["STRATA_FEATURES_ADDR"])
    try:
        inf = srv.stub()
        inf.CreateEndpoint(ipb.CreateEndpointRequest(endpoint=ipb.Endpoint(name="tumour",
                                                                           policy=policy(("tumour", 1, 1)))))
        ids = [0, 7, 211, 568]
        keys = [struct_pb2.Struct(fields={"patient_id": struct_pb2.Value(number_value=i)}) for i in ids]
        by_key = inf.Predict(ipb.PredictRequest(endpoint="tumour", entities=keys))
        rows = [struct_pb2.Struct() for _ in ids]
        for r, i in zip(rows, ids, strict=True):
            r.update({f"tumour__{x}": float(d.data[i, c]) for x, c in zip(names, cols, strict=True)})
        by_rows = inf.Predict(ipb.PredictRequest(endpoint="tumour", rows=rows))
        assert len(by_key.rows) == len(ids) and by_key.rows == by_rows.rows
    finally:
        stop_process(srv.proc)
