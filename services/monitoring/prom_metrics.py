"""The monitoring service's own Prometheus metrics (the dashboards and alert rules of deploy/ read
them; docs/observability.md):

- drift, set whenever a drift report is computed (`drift_computed`, called by the data plane's
  `drift`): per column (feature or prediction output) its score, PSI and drifted flag, and per
  model version the dataset's share of drifted features and its drifted flag, labelled with the
  report's endpoint ("" for a model-level report), model, version and shadow;
- read from the monitoring database at each scrape (`DatabaseCollector`, bound by `watch`): the
  open alerts per rule and state (0 for a rule with none), and the prediction rows stored per
  endpoint, model and version (the Parquet catalog; rows still in the write-ahead log are counted
  once compacted, within STRATA_MONITORING_COMPACT_SECONDS).

Every label is bounded by what the platform holds (rules, model versions, their columns), never
by requests. The monitoring service runs one process, so the default registry serves them.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from services.common.db import Database
from services.monitoring import tables as t
from services.monitoring.types import DriftQuery, DriftReport

log = logging.getLogger("strata.monitoring.metrics")

_VERSION = ["endpoint", "model", "version", "shadow"]
_COLUMN = [*_VERSION, "column", "role"]

DRIFT_SCORE = Gauge("strata_monitoring_drift_score", "Drift score of a column in the last drift report: the "
                    "p-value or distance its method compares with the threshold", _COLUMN)
DRIFT_PSI = Gauge("strata_monitoring_drift_psi", "Population stability index of a column in the last drift "
                  "report (comparable across methods)", _COLUMN)
COLUMN_DRIFTED = Gauge("strata_monitoring_column_drifted", "1 when the last drift report found the column "
                       "drifted, else 0", _COLUMN)
DATASET_DRIFT_SHARE = Gauge("strata_monitoring_dataset_drift_share", "Share of the features found drifted by "
                            "the last drift report of a model version", _VERSION)
DATASET_DRIFTED = Gauge("strata_monitoring_dataset_drifted", "1 when the last drift report of a model version "
                        "found the dataset drifted (share of drifted features >= drift_share), else 0", _VERSION)
DRIFT_ROWS = Gauge("strata_monitoring_drift_rows", "Prediction rows the last drift report of a model version "
                   "compared", _VERSION)
DRIFT_REPORT_TIME = Gauge("strata_monitoring_drift_report_timestamp_seconds", "When the last drift report of a "
                          "model version was computed (Unix time)", _VERSION)


def drift_computed(q: DriftQuery, report: DriftReport) -> None:
    """Set the drift gauges from a report just computed."""
    now = time.time()
    for v in report.versions:
        labels = (q.target.endpoint, v.model, str(v.version), "true" if v.shadow else "false")
        for role, columns in (("feature", v.features.features), ("prediction", v.predictions)):
            for c in columns:
                DRIFT_SCORE.labels(*labels, c.name, role).set(c.score)
                DRIFT_PSI.labels(*labels, c.name, role).set(c.psi)
                COLUMN_DRIFTED.labels(*labels, c.name, role).set(int(c.drifted))
        DATASET_DRIFT_SHARE.labels(*labels).set(v.features.share_drifted)
        DATASET_DRIFTED.labels(*labels).set(int(v.features.dataset_drifted))
        DRIFT_ROWS.labels(*labels).set(v.rows)
        DRIFT_REPORT_TIME.labels(*labels).set(now)


class DatabaseCollector(Collector):
    """Gauges read from the monitoring database when Prometheus scrapes (two small grouped
    queries). A failing query is logged and its metrics left out of that scrape, so /metrics keeps
    answering while the database is away."""

    def __init__(self) -> None:
        self.db: weakref.ref[Database] | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:  # no query when registered
        yield GaugeMetricFamily("strata_monitoring_open_alerts", "", labels=["rule", "state"])
        yield GaugeMetricFamily("strata_monitoring_prediction_rows", "", labels=["endpoint", "model", "version"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        db = self.db() if self.db is not None else None
        if db is None:
            return
        try:
            with db.read() as c:
                rules = [r.name for r in c.execute(select(t.alert_rules.c.name))]
                a = t.alerts.c
                open_counts = c.execute(select(a.rule, a.state, func.count()).where(a.open_key.is_not(None))
                                        .group_by(a.rule, a.state)).all()
                f = t.prediction_files.c
                stored = c.execute(select(f.endpoint, f.model, f.version, func.sum(f.rows))
                                   .group_by(f.endpoint, f.model, f.version)).all()
        except Exception:  # noqa: BLE001 - a scrape must not fail with the database
            log.exception("reading the monitoring database for metrics failed")
            return
        alerts = GaugeMetricFamily("strata_monitoring_open_alerts", "Open alerts (firing or acknowledged) per "
                                   "alert rule and state; 0 firing for a rule with none open",
                                   labels=["rule", "state"])
        counts = {(rule, state): n for rule, state, n in open_counts}
        for rule in rules:  # every rule, so that "no open alert" is a 0 rather than no series
            counts.setdefault((rule, "firing"), 0)
        for (rule, state), n in sorted(counts.items()):
            alerts.add_metric([rule, state], n)
        yield alerts
        rows = GaugeMetricFamily("strata_monitoring_prediction_rows", "Prediction rows stored per endpoint "
                                 "('' for direct model calls), model and version (compacted into Parquet)",
                                 labels=["endpoint", "model", "version"])
        for endpoint, model, version, n in stored:
            rows.add_metric([endpoint, model, str(version)], float(n or 0))
        yield rows


_COLLECTOR = DatabaseCollector()
REGISTRY.register(_COLLECTOR)


def watch(db: Database) -> None:
    """Read the open alerts and stored rows from `db` at each scrape (the service's database; the
    last one given wins, for processes that build more than one data plane, such as tests; held
    weakly, so a database no longer used reports nothing)."""
    _COLLECTOR.db = weakref.ref(db)
