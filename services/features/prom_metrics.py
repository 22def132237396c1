"""The feature service's own Prometheus metrics, per feature view (bounded by the views defined):
how fresh its online rows are, from the pushes and materializations this service ran since it
started, and how many rows each wrote. Online read latency is the shared RPC histogram
(strata_grpc_request_duration_seconds{service="features", method="GetOnlineFeatures"}). The
service runs several serving processes (prometheus-client multiprocess mode): the timestamps are
merged by "max", the newest any process wrote. The dashboards and alert rules of deploy/ read them
(docs/observability.md)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

PUSHED_EVENT_TIME = Gauge("strata_features_pushed_event_timestamp_seconds", "Newest event time pushed to a "
                          "view's online store (Unix time); time() minus it is the freshness of pushed rows",
                          ["view"], multiprocess_mode="max")
PUSHED_ROWS = Counter("strata_features_pushed_rows", "Rows pushed to a view's online store", ["view"])
MATERIALIZED_UNTIL = Gauge("strata_features_materialized_until_timestamp_seconds", "End of the newest "
                           "materialization of a view (Unix time; rows with event times up to it are online)",
                           ["view"], multiprocess_mode="max")
MATERIALIZED_ROWS = Counter("strata_features_materialized_rows", "Rows materialized into a view's online store",
                            ["view"])


def pushed(view: str, newest_event_us: int, rows: int) -> None:
    """After a push of `rows` rows whose newest event time is `newest_event_us`."""
    PUSHED_EVENT_TIME.labels(view).set(newest_event_us / 1e6)
    PUSHED_ROWS.labels(view).inc(rows)


def materialized(view: str, end_us: int, rows: int) -> None:
    """After a materialization of (start, end_us] that wrote `rows` rows."""
    MATERIALIZED_UNTIL.labels(view).set(end_us / 1e6)
    MATERIALIZED_ROWS.labels(view).inc(rows)
