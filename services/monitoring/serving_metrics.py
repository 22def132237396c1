"""Serving metrics for alert rules: the inference service's Prometheus metrics, scraped.

Error-rate and p99-latency rules need the requests of a window: the increase of
`strata_inference_predictions_total{endpoint,model,version,outcome}` and of the buckets of
`strata_inference_prediction_seconds{endpoint,model,version}` between the start and the end of the
window, which is what Prometheus' `increase()` gives. Without a Prometheus server in the embedded
platform, this module keeps the samples itself: it scrapes each URL (every `every` seconds from a
thread, and before an evaluation when the last sample is older than a second), keeps the samples of
the last `retention` per URL, and takes increases per URL (a counter that went down is a restarted
process: its new value is the increase, as Prometheus treats resets) before summing the URLs. A
window longer than the samples kept starts at the oldest sample; the note of the rule says so.

The p99 is read from the bucket increases as Prometheus' histogram_quantile reads them: the rank
q * count falls into the first bucket whose cumulative count reaches it, and the value is
interpolated linearly within that bucket (from 0 for the first bucket); a rank in the +Inf bucket
gives the highest finite bound.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("strata.monitoring.serving_metrics")

REQUESTS = "strata_inference_predictions"
LATENCY = "strata_inference_prediction_seconds"

SeriesKey = tuple[str, str, str]  # endpoint, model, version


@dataclass(frozen=True)
class Sample:
    time: float                                             # time.time() of the scrape
    requests: dict[tuple[SeriesKey, str], float]            # (series, outcome) -> count
    buckets: dict[SeriesKey, dict[float, float]]            # series -> le -> cumulative count


@dataclass
class WindowCounts:
    """Increases over a window, summed over the matching series and the URLs."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)   # le -> cumulative increase
    covered_seconds: float = 0.0                                 # how much of the window the samples cover

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def parse(text: str, now: float) -> Sample:
    requests: dict[tuple[SeriesKey, str], float] = {}
    buckets: dict[SeriesKey, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (REQUESTS, LATENCY):
            continue
        for s in family.samples:
            key = (s.labels.get("endpoint", ""), s.labels.get("model", ""), s.labels.get("version", ""))
            if family.name == REQUESTS and s.name == REQUESTS + "_total":
                requests[(key, s.labels.get("outcome", ""))] = s.value
            elif family.name == LATENCY and s.name == LATENCY + "_bucket":
                buckets.setdefault(key, {})[float(s.labels["le"])] = s.value
    return Sample(now, requests, buckets)


def _http_get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - URLs from the service's settings
        return r.read().decode()


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative bucket counts (le -> count); NaN when empty."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return math.nan
    total = buckets[bounds[-1]]
    if total <= 0:
        return math.nan
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for i, le in enumerate(bounds):
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return bounds[i - 1] if i > 0 else math.nan
            if i == 0 and le <= 0:
                return le
            return prev_bound + (le - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = le, count
    return bounds[-2] if len(bounds) > 1 else math.nan


class ServingMetrics:
    def __init__(self, urls: Sequence[str], *, retention: float = 6 * 3600, timeout: float = 5.0,
                 fetch: Callable[[str, float], str] = _http_get, clock: Callable[[], float] = time.time) -> None:
        self.urls = list(urls)
        self.retention = retention
        self.timeout = timeout
        self.fetch = fetch
        self.clock = clock
        self._samples: dict[str, deque[Sample]] = {u: deque() for u in self.urls}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def sample(self) -> None:
        """Scrape every URL once; a URL that does not answer keeps its earlier samples."""
        for url in self.urls:
            now = self.clock()
            try:
                s = parse(self.fetch(url, self.timeout), now)
            except Exception as e:  # down, or not a metrics page: the evaluation says so
                with self._lock:
                    self._errors[url] = f"{type(e).__name__}: {e}"[:300]
                continue
            with self._lock:
                self._errors.pop(url, None)
                kept = self._samples[url]
                kept.append(s)
                while kept and kept[0].time < now - self.retention:
                    kept.popleft()

    def fresh(self, max_age: float = 1.0) -> None:
        """Sample unless every URL has a sample younger than `max_age` seconds."""
        now = self.clock()
        with self._lock:
            stale = any(not kept or kept[-1].time < now - max_age for kept in self._samples.values())
        if stale:
            self.sample()

    def errors(self) -> dict[str, str]:
        with self._lock:
            return dict(self._errors)

    def window(self, endpoint: str, model: str, version: int, seconds: float) -> WindowCounts:
        """The increases over the last `seconds` of the endpoint's series (of one model version
        when `model` is given)."""
        out = WindowCounts()
        start = self.clock() - seconds
        with self._lock:
            per_url = [list(kept) for kept in self._samples.values() if kept]
        covered = []
        for kept in per_url:
            last = kept[-1]
            first = next((s for s in reversed(kept) if s.time <= start), kept[0])
            covered.append(last.time - first.time)

            def wanted(key: SeriesKey) -> bool:
                return key[0] == endpoint and (not model or (key[1], key[2]) == (model, str(version)))

            for (key, outcome), value in last.requests.items():
                if wanted(key):
                    inc = _increase(first.requests.get((key, outcome), 0.0), value)
                    out.requests += inc
                    if outcome != "ok":
                        out.errors += inc
            for key, bounds in last.buckets.items():
                if wanted(key):
                    before = first.buckets.get(key, {})
                    for le, value in bounds.items():
                        out.buckets[le] = out.buckets.get(le, 0.0) + _increase(before.get(le, 0.0), value)
        out.covered_seconds = min(covered) if covered else 0.0
        return out

    def run(self, stop: threading.Event, every: float) -> None:
        """The sampling loop (a thread)."""
        while not stop.is_set():
            try:
                self.sample()
            except Exception:
                log.exception("sampling the serving metrics failed")
            stop.wait(every)


def _increase(before: float, after: float) -> float:
    return after - before if after >= before else after  # a reset: the process started again
