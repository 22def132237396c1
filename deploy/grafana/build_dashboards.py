"""Writes deploy/grafana/dashboards/*.json, the Grafana dashboards of docs/observability.md.

Edit the panels here and run `.venv/bin/python deploy/grafana/build_dashboards.py`: the JSON files
are generated, so that every panel has the same datasource, variables and layout rules. Every
query uses the `${datasource}` variable; tests/deploy/test_observability.py runs every expression
against a real Prometheus scraping a real platform."""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'endpoint=~"$endpoint", model=~"$model", version=~"$version"'   # serving and monitoring panels
RATE = "$__rate_interval"


def variable(name: str, query: str, label: str) -> dict:
    return {"type": "query", "name": name, "label": label, "datasource": DS,
            "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [], "hide": 0}


DATASOURCE = {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
              "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []}


def panel(title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
          description: str = "", w: int = 12, h: int = 8) -> dict:
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "gridPos": {"w": w, "h": h},
         "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend,
                      "range": kind == "timeseries", "instant": kind != "timeseries"}
                     for i, (expr, legend) in enumerate(targets)],
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {}}
    if kind == "timeseries":
        p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}
    elif kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "none", "textMode": "value_and_name"}
    elif kind == "bargauge":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "orientation": "horizontal", "displayMode": "gradient"}
    return p


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def dashboard(uid: str, title: str, description: str, variables: list[dict], items: list[dict]) -> dict:
    x = y = line_h = 0
    for i, item in enumerate(items, start=1):
        item["id"] = i
        g = item["gridPos"]
        if item["type"] == "row" or x + g["w"] > 24:
            x, y, line_h = 0, y + line_h, 0
        g["x"], g["y"] = x, y
        if item["type"] == "row":
            y += g["h"]
        else:
            x += g["w"]
            line_h = max(line_h, g["h"])
    return {"uid": uid, "title": title, "description": description, "tags": ["strata"], "editable": True,
            "schemaVersion": 39, "version": 1, "timezone": "", "refresh": "30s", "graphTooltip": 1,
            "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "fiscalYearStartMonth": 0,
            "liveNow": False, "annotations": {"list": []},
            "links": [{"type": "dashboards", "tags": ["strata"], "asDropdown": True, "title": "Strata",
                       "includeVars": False, "keepTime": True}],
            "templating": {"list": [DATASOURCE, *variables]}, "panels": items}


def process_panels(services: str) -> list[dict]:
    sel = f'service=~"{services}"'
    return [
        panel("CPU per serving process (cores)", [(f"sum by (service, worker, pid) (rate(strata_process_cpu_seconds{{{sel}}}[{RATE}]))",
                                                   "{{service}} worker {{worker}} pid {{pid}}")], "short",
              description="strata_process_cpu_seconds: user + system CPU of each serving process (multi-process "
                          "services: one series per process, labelled pid and worker slot)"),
        panel("Resident memory per serving process", [(f"sum by (service, worker, pid) (strata_process_resident_memory_bytes{{{sel}}})",
                                                        "{{service}} worker {{worker}} pid {{pid}}")], "bytes"),
        panel("Serving process restarts (start time changes)", [
            (f"count by (service) (changes(strata_process_start_time_seconds{{{sel}}}[1h]) > 0) or "
             f"count by (service) (strata_process_start_time_seconds{{{sel}}}) * 0", "{{service}}")], "short",
              kind="stat", w=8, description="Processes whose start time changed in the last hour"),
        panel("Uptime of the oldest serving process", [(f"time() - min by (service) (strata_process_start_time_seconds{{{sel}}})",
                                                        "{{service}}")], "s", kind="stat", w=8),
        panel("Scrape targets up", [('up{job=~"strata-.*"}', "{{job}} {{instance}}")], "short", kind="stat", w=8,
              description="1 per metrics endpoint Prometheus reaches (deploy/prometheus/prometheus.yml)"),
    ]


def serving() -> dict:
    s = SEL
    q = f"strata_inference_predictions_total{{{s}}}"
    lat = f"strata_inference_prediction_seconds_bucket{{{s}}}"
    mv = 'model=~"$model", version=~"$version"'
    items = [
        row("Requests and errors (per endpoint, model and version)"),
        panel("Requests per second", [(f"sum by (endpoint, model, version) (rate({q}[{RATE}]))",
                                       "{{endpoint}} {{model}} v{{version}}")], "reqps",
              description="strata_inference_predictions_total: Predict, V2 ModelInfer and entity calls, per "
                          "endpoint and the version that served them (shadow runs included)"),
        panel("Errors per second", [(f'sum by (endpoint, model, version) (rate(strata_inference_predictions_total{{outcome="error", {s}}}[{RATE}]))',
                                     "{{endpoint}} {{model}} v{{version}}")], "reqps",
              description="Requests the model failed on (outcome=error)"),
        panel("Error ratio", [(f'sum by (endpoint, model, version) (rate(strata_inference_predictions_total{{outcome="error", {s}}}[{RATE}])) / '
                               f"sum by (endpoint, model, version) (rate({q}[{RATE}]))",
                               "{{endpoint}} {{model}} v{{version}}")], "percentunit"),
        panel("Predictions served (since the serving processes started)", [
            (f"sum by (endpoint, model, version, outcome) ({q})", "{{endpoint}} {{model}} v{{version}} {{outcome}}")],
            "short", kind="stat", description="The counters themselves: requests per outcome"),
        row("Latency"),
        panel("Latency p50 and p99 (queue + compute)", [
            (f"histogram_quantile(0.5, sum by (endpoint, model, version, le) (rate({lat}[{RATE}])))",
             "p50 {{endpoint}} {{model}} v{{version}}"),
            (f"histogram_quantile(0.99, sum by (endpoint, model, version, le) (rate({lat}[{RATE}])))",
             "p99 {{endpoint}} {{model}} v{{version}}")], "s",
              description="strata_inference_prediction_seconds; the alert floor is 50 ms at p99"),
        panel("Model compute time per batch p99", [
            (f"histogram_quantile(0.99, sum by (model, version, le) (rate(strata_inference_compute_seconds_bucket{{{mv}}}[{RATE}])))",
             "{{model}} v{{version}}")], "s"),
        panel("API latency p99 by method (inference gRPC)", [
            (f'histogram_quantile(0.99, sum by (method, le) (rate(strata_grpc_request_duration_seconds_bucket{{service="inference"}}[{RATE}])))',
             "{{method}}")], "s"),
        panel("API errors by method and code (inference gRPC)", [
            (f'sum by (method, code) (rate(strata_grpc_requests_total{{service="inference", code!="OK"}}[{RATE}]))',
             "{{method}} {{code}}")], "reqps",
              description="Refused calls (INVALID_ARGUMENT, NOT_FOUND, ...) as well as failures"),
        row("Batching"),
        panel("Rows per model execution (mean)", [
            (f"sum by (model, version) (rate(strata_inference_batch_rows_sum{{{mv}}}[{RATE}])) / "
             f"sum by (model, version) (rate(strata_inference_batch_rows_count{{{mv}}}[{RATE}]))", "{{model}} v{{version}}")],
              "short", w=8),
        panel("Rows per model execution p99", [
            (f"histogram_quantile(0.99, sum by (model, version, le) (rate(strata_inference_batch_rows_bucket{{{mv}}}[{RATE}])))",
             "{{model}} v{{version}}")], "short", w=8),
        panel("Queue depth (requests waiting for the model)", [
            (f"sum by (model, version) (strata_inference_queue_depth{{{mv}}})", "{{model}} v{{version}}")], "short", w=8),
        row("Prediction log"),
        panel("Prediction log records per second by outcome", [
            (f"sum by (outcome) (rate(strata_inference_prediction_log_total[{RATE}]))", "{{outcome}}")], "short",
              description="delivered / spooled (monitoring away) / rejected (set aside) / dropped (lost)"),
        panel("Prediction log records dropped (last hour)", [
            ('sum(increase(strata_inference_prediction_log_total{outcome="dropped"}[1h])) or vector(0)', "dropped")],
            "short", kind="stat", w=6),
        panel("Shadow runs skipped per second", [
            (f"sum by (endpoint) (rate(strata_inference_shadow_skipped_total[{RATE}]))", "{{endpoint}}")], "short", w=6),
        row("Serving processes (CPU and memory of every serving process)"),
        *process_panels(".*"),
    ]
    return dashboard("strata-serving", "Strata / Serving",
                     "Inference: requests, errors, latency per endpoint, model and version; batching; the "
                     "prediction log; CPU and memory of every serving process",
                     [variable("endpoint", "label_values(strata_inference_predictions_total, endpoint)", "Endpoint"),
                      variable("model", 'label_values(strata_inference_predictions_total{endpoint=~"$endpoint"}, model)',
                               "Model"),
                      variable("version", 'label_values(strata_inference_predictions_total{endpoint=~"$endpoint", '
                                          'model=~"$model"}, version)', "Version")], items)


def features() -> dict:
    read = 'service="features", method="GetOnlineFeatures"'
    lat = f"strata_grpc_request_duration_seconds_bucket{{{read}}}"
    items = [
        row("Online reads"),
        panel("Online reads per second by code", [
            (f"sum by (code) (rate(strata_grpc_requests_total{{{read}}}[{RATE}]))", "{{code}}")], "reqps"),
        panel("Online read latency p50 and p99", [
            (f"histogram_quantile(0.5, sum by (le) (rate({lat}[{RATE}])))", "p50"),
            (f"histogram_quantile(0.99, sum by (le) (rate({lat}[{RATE}])))", "p99")], "s"),
        row("Freshness (per feature view)"),
        panel("Age of the newest pushed event", [
            ('time() - max by (view) (strata_features_pushed_event_timestamp_seconds{view=~"$view"})', "{{view}}")],
              "s", description="time() - strata_features_pushed_event_timestamp_seconds: how old the newest row "
                               "pushed to the view is (pushes since the service started)"),
        panel("Age of the newest materialization's end", [
            ('time() - max by (view) (strata_features_materialized_until_timestamp_seconds{view=~"$view"})', "{{view}}")],
              "s", description="Rows with event times up to the end of the newest materialization are online"),
        panel("Rows pushed per second", [
            (f'sum by (view) (rate(strata_features_pushed_rows_total{{view=~"$view"}}[{RATE}]))', "{{view}}")], "short"),
        panel("Rows materialized per second", [
            (f'sum by (view) (rate(strata_features_materialized_rows_total{{view=~"$view"}}[{RATE}]))', "{{view}}")],
              "short"),
        row("API"),
        panel("Calls per second by method", [
            (f'sum by (method) (rate(strata_grpc_requests_total{{service="features"}}[{RATE}]))', "{{method}}")], "reqps"),
        panel("Errors per second by method and code", [
            (f'sum by (method, code) (rate(strata_grpc_requests_total{{service="features", code!="OK"}}[{RATE}]))',
             "{{method}} {{code}}")], "reqps"),
        panel("Push latency p99", [
            (f'histogram_quantile(0.99, sum by (le) (rate(strata_grpc_request_duration_seconds_bucket{{service="features", method="PushFeatures"}}[{RATE}])))',
             "p99")], "s"),
        row("Serving processes"),
        *process_panels("features"),
    ]
    return dashboard("strata-features", "Strata / Features",
                     "Feature store: online read latency, freshness and rows written per view",
                     [variable("view", "label_values(strata_features_pushed_rows_total, view)", "Feature view")], items)


def training() -> dict:
    items = [
        row("Jobs"),
        panel("Jobs by state", [("sum by (state) (strata_training_jobs)", "{{state}}")], "short", kind="bargauge"),
        panel("Queued and running jobs", [('sum by (state) (strata_training_jobs{state=~"queued|running"})', "{{state}}")],
              "short"),
        panel("Jobs failed in the last hour", [('sum(delta(strata_training_jobs{state="failed"}[1h])) or vector(0)', "failed")],
              "short", kind="stat", w=8),
        panel("Jobs finished per hour by state", [
            ('sum by (state) (delta(strata_training_jobs{state=~"succeeded|failed|cancelled"}[1h]))', "{{state}}")],
              "short", kind="stat", w=8),
        panel("Submits per second (SubmitTrainingJob)", [
            (f'sum by (code) (rate(strata_grpc_requests_total{{service="training", method="SubmitTrainingJob"}}[{RATE}]))',
             "{{code}}")], "reqps", w=8),
        row("Trials"),
        panel("Trials by outcome (all jobs)", [("sum by (outcome) (strata_training_trials)", "{{outcome}}")], "short"),
        panel("Trials per minute by outcome", [("sum by (outcome) (delta(strata_training_trials[5m])) / 5", "{{outcome}}")],
              "short"),
        panel("Trials planned by the running jobs", [("sum(strata_training_running_trials_planned)", "planned")],
              "short", kind="stat", w=8),
        row("API and processes"),
        panel("Calls per second by method and code", [
            (f'sum by (method, code) (rate(strata_grpc_requests_total{{service="training"}}[{RATE}]))', "{{method}} {{code}}")],
              "reqps"),
        *process_panels("training"),
    ]
    return dashboard("strata-training", "Strata / Training", "Training jobs by state and their trials", [], items)


def monitoring() -> dict:
    s = SEL
    items = [
        row("Dataset drift (set when a drift report is computed)"),
        panel("Dataset drifted", [(f"max by (endpoint, model, version) (strata_monitoring_dataset_drifted{{{s}}})",
                                   "{{endpoint}} {{model}} v{{version}}")], "short", kind="stat", w=8,
              description="1: the share of drifted features reached the report's drift_share"),
        panel("Share of drifted features", [(f"max by (endpoint, model, version) (strata_monitoring_dataset_drift_share{{{s}}})",
                                             "{{endpoint}} {{model}} v{{version}}")], "percentunit", w=8),
        panel("Age of the last drift report", [(f"time() - max by (endpoint, model, version) "
                                                f"(strata_monitoring_drift_report_timestamp_seconds{{{s}}})",
                                                "{{endpoint}} {{model}} v{{version}}")], "s", kind="stat", w=8),
        row("Drift per feature"),
        panel("Drift score per feature (p-value or distance of its method)", [
            (f'max by (endpoint, model, version, column) (strata_monitoring_drift_score{{role="feature", {s}}})',
             "{{column}} ({{model}} v{{version}})")], "short", kind="bargauge"),
        panel("PSI per feature", [(f'max by (endpoint, model, version, column) (strata_monitoring_drift_psi{{role="feature", {s}}})',
                                   "{{column}} ({{model}} v{{version}})")], "short", kind="bargauge"),
        panel("Drifted features", [(f'max by (endpoint, model, version, column) (strata_monitoring_column_drifted{{role="feature", {s}}}) == 1',
                                    "{{column}} ({{model}} v{{version}})")], "short", kind="stat",
              description="Only the drifted ones"),
        panel("Drift of the predictions (PSI per output)", [
            (f'max by (endpoint, model, version, column) (strata_monitoring_drift_psi{{role="prediction", {s}}})',
             "{{column}} ({{model}} v{{version}})")], "short", kind="bargauge"),
        row("Alerts"),
        panel("Open alerts per rule (monitoring alert rules)", [("sum by (rule, state) (strata_monitoring_open_alerts)",
                                                                 "{{rule}} {{state}}")], "short", kind="bargauge"),
        panel("Prometheus alerts firing (deploy/prometheus/alerts.yml)", [
            ('sum by (alertname, severity) (ALERTS{alertstate="firing", alertname=~"Strata.*"})', "{{alertname}}")],
              "short", kind="stat"),
        row("Ingestion"),
        panel("Prediction rows stored", [(f"max by (endpoint, model, version) (strata_monitoring_prediction_rows{{{s}}})",
                                          "{{endpoint}} {{model}} v{{version}}")], "short"),
        panel("Rows ingested per second", [(f"sum by (endpoint, model, version) (deriv(strata_monitoring_prediction_rows{{{s}}}[5m]))",
                                            "{{endpoint}} {{model}} v{{version}}")], "short"),
        panel("Monitoring calls per second by method and code", [
            (f'sum by (method, code) (rate(strata_grpc_requests_total{{service="monitoring"}}[{RATE}]))',
             "{{method}} {{code}}")], "reqps"),
        panel("Monitoring API latency p99 by method", [
            (f'histogram_quantile(0.99, sum by (method, le) (rate(strata_grpc_request_duration_seconds_bucket{{service="monitoring"}}[{RATE}])))',
             "{{method}}")], "s"),
        *process_panels("monitoring"),
    ]
    return dashboard("strata-monitoring", "Strata / Monitoring", "Drift per feature, open alerts and ingestion",
                     [variable("endpoint", "label_values(strata_monitoring_dataset_drifted, endpoint)", "Endpoint"),
                      variable("model", 'label_values(strata_monitoring_dataset_drifted{endpoint=~"$endpoint"}, model)',
                               "Model"),
                      variable("version", 'label_values(strata_monitoring_dataset_drifted{endpoint=~"$endpoint", '
                                          'model=~"$model"}, version)', "Version")], items)


def main() -> None:
    for name, build in (("serving", serving), ("features", features), ("training", training),
                        ("monitoring", monitoring)):
        (OUT / f"{name}.json").write_text(json.dumps(build(), indent=2) + "\n")


if __name__ == "__main__":
    main()
