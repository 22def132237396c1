"""How each kind of alert condition is judged: the same reports the RPCs return (reports.drift,
reports.performance) over the rule's window, and the serving metrics for error rate and latency.

A verdict is given per model version and shadow flag in the window (target
"models/{model}/versions/{version}[/shadow]"), or per endpoint for the serving metrics
("endpoints/{endpoint}"). What cannot be judged (no rows in the window, no reference, a column the
version lacks, too few labels or requests) gives no verdict and a note instead.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from services.monitoring import prom_metrics, reports
from services.monitoring.alerts import (
    LOWER_IS_BETTER,
    ConditionKind,
    Rule,
    Verdict,
    describe_columns,
    drift_override,
    version_target,
)
from services.monitoring.labels import GroundTruthStore
from services.monitoring.references import ReferenceStore
from services.monitoring.serving_metrics import ServingMetrics, histogram_quantile
from services.monitoring.store import PredictionStore
from services.monitoring.types import DriftQuery, PerformanceQuery, Target

DEFAULT_DRIFT_SHARE = 0.5


class ConditionJudge:
    def __init__(self, predictions: PredictionStore, references: ReferenceStore, labels: GroundTruthStore,
                 serving: ServingMetrics | None) -> None:
        self.predictions = predictions
        self.references = references
        self.labels = labels
        self.serving = serving

    def __call__(self, rule: Rule, now: datetime) -> tuple[list[Verdict], list[str]]:
        spec, c = rule.spec, rule.spec.condition
        target = Target(spec.endpoint, spec.model, spec.version)
        start = now - timedelta(seconds=spec.window_seconds)
        if c.kind == ConditionKind.DATASET_DRIFT:
            share = c.threshold or DEFAULT_DRIFT_SHARE
            query = DriftQuery(target, start, now, {}, share)
            report = reports.drift(self.predictions, self.references, query, now)
            prom_metrics.drift_computed(query, report)  # (the dashboards follow what the rules see)
            return [Verdict(version_target(v.model, v.version, v.shadow), v.features.dataset_drifted,
                            v.features.share_drifted, share,
                            f"{v.features.n_drifted} of {len(v.features.features)} features drifted "
                            f"({v.features.share_drifted:.0%}, dataset drift at {share:.0%}): "
                            + describe_columns(f.name for f in v.features.features if f.drifted))
                    for v in report.versions], []
        if c.kind == ConditionKind.COLUMN_DRIFT:
            return self._column_drift(rule, target, start, now)
        if c.kind == ConditionKind.PERFORMANCE:
            return self._performance(rule, target, start, now)
        return self._serving(rule, now)

    def _column_drift(self, rule: Rule, target: Target, start: datetime,
                      now: datetime) -> tuple[list[Verdict], list[str]]:
        c = rule.spec.condition
        query = DriftQuery(target, start, now, {c.column: drift_override(c)})
        report = reports.drift(self.predictions, self.references, query, now)
        prom_metrics.drift_computed(query, report)
        verdicts, notes = [], []
        for v in report.versions:
            name = version_target(v.model, v.version, v.shadow)
            found = next((f for f in (*v.features.features, *v.predictions) if f.name == c.column), None)
            if found is None:
                notes.append(f"{name}: the window's rows have no column {c.column!r}")
                continue
            verdicts.append(Verdict(name, found.drifted, found.score, found.threshold,
                                    f"{c.column!r} {'drifted' if found.drifted else 'did not drift'}: "
                                    f"{found.method} score {found.score:.4g} (threshold {found.threshold:g}), "
                                    f"PSI {found.psi:.4g}, {found.n_current} rows"))
        return verdicts, notes

    def _performance(self, rule: Rule, target: Target, start: datetime,
                     now: datetime) -> tuple[list[Verdict], list[str]]:
        c = rule.spec.condition
        report = reports.performance(self.predictions, self.references, self.labels,
                                     PerformanceQuery(target, start, now), now)
        verdicts, notes = [], []
        for v in report.versions:
            name = version_target(v.model, v.version, v.shadow)
            value = getattr(v.metrics, c.metric, None) if v.metrics is not None else None
            if v.labeled_rows < c.rows_needed:
                notes.append(f"{name}: {v.labeled_rows} labelled rows, {c.rows_needed} needed")
            elif value is None or not math.isfinite(value):
                notes.append(f"{name}: no {c.metric} ({v.note or 'not computed for its task'})")
            else:
                lower = c.metric in LOWER_IS_BETTER
                firing = value > c.threshold if lower else value < c.threshold
                verdicts.append(Verdict(name, firing, value, c.threshold,
                                        f"{c.metric} {value:.4g} {'above' if lower else 'below'} "
                                        f"{c.threshold:g} on {v.labeled_rows} labelled rows" if firing else
                                        f"{c.metric} {value:.4g} on {v.labeled_rows} labelled rows"))
        return verdicts, notes

    def _serving(self, rule: Rule, now: datetime) -> tuple[list[Verdict], list[str]]:
        spec, c = rule.spec, rule.spec.condition
        if self.serving is None or not self.serving.urls:
            return [], ["no serving metrics are configured (STRATA_MONITORING_METRICS_URLS)"]
        self.serving.fresh()
        notes = [f"{url}: {error}" for url, error in self.serving.errors().items()]
        counts = self.serving.window(spec.endpoint, spec.model, spec.version, spec.window_seconds)
        name = f"endpoints/{spec.endpoint}" + (f"/{version_target(spec.model, spec.version, False)}"
                                               if spec.model else "")
        if counts.covered_seconds < spec.window_seconds:
            notes.append(f"the samples kept cover {counts.covered_seconds:.0f} s of the {spec.window_seconds} s window")
        if counts.requests < c.rows_needed:
            return [], [*notes, f"{name}: {counts.requests:.0f} requests in the window, {c.rows_needed} needed"]
        if c.kind == ConditionKind.ERROR_RATE:
            rate = counts.error_rate
            return [Verdict(name, rate > c.threshold, rate, c.threshold,
                            f"{counts.errors:.0f} of {counts.requests:.0f} predictions failed ({rate:.2%})")], notes
        p99 = histogram_quantile(0.99, counts.buckets) * 1000
        if math.isnan(p99):
            return [], [*notes, f"{name}: no latency histogram in the window"]
        return [Verdict(name, p99 > c.threshold, p99, c.threshold,
                        f"p99 {p99:.2f} ms over {counts.requests:.0f} predictions")], notes
