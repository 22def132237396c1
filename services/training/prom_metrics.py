"""The training service's own Prometheus metrics, read from its database when Prometheus scrapes
(jobs run in worker processes, possibly on other hosts, that serve no metrics; the job table is
what every one of them writes): jobs per state, and the trials of all jobs per outcome, from each
job's progress. One grouped query per scrape. The dashboards and alert rules of deploy/ read them
(docs/observability.md)."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from services.common.db import Database
from services.training import tables as t
from services.training.types import JobState

log = logging.getLogger("strata.training.metrics")

#: Progress fields summed into strata_training_trials{outcome}.
TRIAL_OUTCOMES = {"done": "trials_done", "pruned": "trials_pruned", "failed": "trials_failed"}


class DatabaseCollector(Collector):
    def __init__(self) -> None:
        self.db: weakref.ref[Database] | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:  # no query when registered
        yield GaugeMetricFamily("strata_training_jobs", "", labels=["state"])
        yield GaugeMetricFamily("strata_training_trials", "", labels=["outcome"])
        yield GaugeMetricFamily("strata_training_running_trials_planned", "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        db = self.db() if self.db is not None else None
        if db is None:
            return
        progress = t.jobs.c.progress
        sums = [func.coalesce(func.sum(progress[field].as_integer()), 0) for field in TRIAL_OUTCOMES.values()]
        try:
            with db.read() as c:
                rows = c.execute(select(t.jobs.c.state, func.count(), func.coalesce(
                    func.sum(progress["trials_total"].as_integer()), 0), *sums).group_by(t.jobs.c.state)).all()
        except Exception:  # noqa: BLE001 - a scrape must not fail with the database
            log.exception("reading the training database for metrics failed")
            return
        jobs = GaugeMetricFamily("strata_training_jobs", "Training jobs per state (queued, running, succeeded, "
                                 "failed, cancelled)", labels=["state"])
        trials = GaugeMetricFamily("strata_training_trials", "Trials of all jobs per outcome (done, pruned, failed), "
                                   "from the jobs' progress", labels=["outcome"])
        planned = GaugeMetricFamily("strata_training_running_trials_planned", "Trials the running jobs plan "
                                    "in all (their searches' n_trials)")
        by_state = {JobState(s): r for s, *r in rows if s in JobState._value2member_map_}
        for state in JobState:
            if state != JobState.UNSPECIFIED:
                jobs.add_metric([state.name.lower()], by_state[state][0] if state in by_state else 0)
        for i, outcome in enumerate(TRIAL_OUTCOMES):
            trials.add_metric([outcome], float(sum(r[2 + i] for r in by_state.values())))
        running = by_state.get(JobState.RUNNING)
        planned.add_metric([], float(running[1]) if running else 0.0)
        yield jobs
        yield trials
        yield planned


_COLLECTOR = DatabaseCollector()
REGISTRY.register(_COLLECTOR)


def watch(db: Database) -> None:
    """Read the metrics from `db` at each scrape (held weakly; the last one given wins)."""
    _COLLECTOR.db = weakref.ref(db)
