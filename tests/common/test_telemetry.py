"""RpcMetrics: tallies added in bulk give the same Prometheus exposition as observing each call."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.common import telemetry


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_flush_adds_counts_sums_and_buckets() -> None:
    metrics = telemetry.RpcMetrics("tally-test")
    latencies = [0.00005, 0.0001, 0.0004, 0.003, 0.003, 0.2, 31.0]  # on a bound, between bounds, past the last
    for seconds in latencies:
        metrics.record("Read", "OK", seconds)
    metrics.record("Read", "NOT_FOUND", 0.001)
    metrics.in_flight = 3
    assert _sample("strata_grpc_requests_total", service="tally-test", method="Read", code="OK") is None  # not yet
    metrics.flush()
    assert _sample("strata_grpc_requests_total", service="tally-test", method="Read", code="OK") == 7
    assert _sample("strata_grpc_requests_total", service="tally-test", method="Read", code="NOT_FOUND") == 1
    assert _sample("strata_grpc_in_flight", service="tally-test") == 3
    observed = [*latencies, 0.001]
    for bound in (*telemetry._BUCKETS, float("inf")):
        le = "+Inf" if bound == float("inf") else repr(float(bound))
        got = _sample("strata_grpc_request_duration_seconds_bucket", service="tally-test", method="Read", le=le)
        assert got == sum(1 for s in observed if s <= bound), le
    assert abs(_sample("strata_grpc_request_duration_seconds_sum", service="tally-test", method="Read")
               - sum(observed)) < 1e-9
    metrics.record("Read", "OK", 0.002)
    metrics.flush()  # adds to what is there; an empty flush changes nothing
    metrics.flush()
    assert _sample("strata_grpc_requests_total", service="tally-test", method="Read", code="OK") == 8
    assert _sample("strata_grpc_request_duration_seconds_count", service="tally-test", method="Read") == 9
