"""A small Python client of the monitoring service on the generated stubs, for the CLI and scripts:
the bearer token on every call (services/common/client.py), and the reports' requests built from a
target (endpoint and/or model version) and a window."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from google.protobuf import timestamp_pb2
from strata.monitoring.v1 import monitoring_pb2 as pb
from strata.monitoring.v1 import monitoring_pb2_grpc

from services.common.client import open_channel

#: Reports read a window of stored predictions (DuckDB over Parquet): more than a unary call's usual.
REPORT_TIMEOUT = 300.0


def time_window(start: datetime | None = None, end: datetime | None = None) -> pb.TimeWindow:
    """A window from aware datetimes; None leaves the bound to the service (end: now, start: a
    day before end)."""
    w = pb.TimeWindow()
    for field, t in (("start_time", start), ("end_time", end)):
        if t is not None:
            ts = timestamp_pb2.Timestamp()
            ts.FromDatetime(t)
            getattr(w, field).CopyFrom(ts)
    return w


class MonitoringClient:
    def __init__(self, addr: str, token: str | None = None, tls_ca: Path | None = None) -> None:
        self._channel, channel = open_channel(addr, token, tls_ca)
        self.stub = monitoring_pb2_grpc.MonitoringServiceStub(channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MonitoringClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drift(self, endpoint: str = "", model: str = "", version: int = 0,
              window: pb.TimeWindow | None = None) -> pb.GetDriftReportResponse:
        return self.stub.GetDriftReport(pb.GetDriftReportRequest(
            endpoint=endpoint, model=model, version=version, window=window), timeout=REPORT_TIMEOUT)

    def drift_html(self, endpoint: str = "", model: str = "", version: int = 0,
                   window: pb.TimeWindow | None = None) -> str:
        body = self.stub.GetDriftReportHtml(pb.GetDriftReportRequest(
            endpoint=endpoint, model=model, version=version, window=window), timeout=REPORT_TIMEOUT)
        return body.data.decode()

    def quality(self, endpoint: str = "", model: str = "", version: int = 0,
                window: pb.TimeWindow | None = None) -> pb.GetDataQualityResponse:
        return self.stub.GetDataQuality(pb.GetDataQualityRequest(
            endpoint=endpoint, model=model, version=version, window=window), timeout=REPORT_TIMEOUT)

    def performance(self, endpoint: str = "", model: str = "", version: int = 0,
                    window: pb.TimeWindow | None = None) -> pb.GetPerformanceResponse:
        return self.stub.GetPerformance(pb.GetPerformanceRequest(
            endpoint=endpoint, model=model, version=version, window=window), timeout=REPORT_TIMEOUT)
