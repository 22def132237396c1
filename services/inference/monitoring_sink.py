"""The prediction log's sink to the monitoring service: each write is one IngestPredictions
stream, and returns once monitoring has answered, that is once every row of the stream is fsync'd
there. A write that fails raises, so the prediction log spools the batch and sends it again later;
monitoring is idempotent by prediction id, so a batch sent twice (an answer lost, a replay after
a restart) is stored once.

The records are already PredictionRecord wire bytes: the request messages are put together
around them (field 1, length-delimited) without parsing them, and sent with a serializer that
passes bytes through, as monitoring reads them without a deserializer.

Tracing: a batch belongs to no single request, so a delivery is a trace of its own: a span
"prediction_log.deliver" (attribute `prediction_log.records`) whose context the stream carries,
so monitoring's IngestPredictions server span is its child. A prediction is tied to the request
that made it by its prediction id (the request id, PredictionRecord.request_id, also the
`strata.request_id` attribute of the request's server span), not by trace context.

A batch monitoring refuses as invalid (INVALID_ARGUMENT: a tensor of rank 3, a request id over
256 characters) would be refused again on every retry and hold up the spool behind it. It is
split in halves and each half sent again, down to the single records at fault; those are
appended to a local file of their own (`rejected`) and reported as refused, the rest is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from strata.monitoring.v1 import monitoring_pb2

from services.common.client import MAX_MESSAGE, ClientTLS, trace_metadata
from services.common.errors import StrataError, Unavailable
from services.inference.predlog import FileSink, varint

log = logging.getLogger("strata.inference.monitoring_sink")

METHOD = "/strata.monitoring.v1.MonitoringService/IngestPredictions"
#: Records are grouped into request messages of at most this many bytes (a record bigger than
#: this goes alone): small enough for any proxy's defaults, large enough to cost few messages.
MESSAGE_BYTES = 4 << 20
_RECORDS_TAG = b"\x0a"  # IngestPredictionsRequest.records: field 1, wire type 2
DELIVER_SPAN = "prediction_log.deliver"
_tracer = trace.get_tracer("strata.inference.predlog")


def messages(records: list[bytes], limit: int = MESSAGE_BYTES) -> Iterator[bytes]:
    """IngestPredictionsRequest messages holding `records` in order, each at most `limit` bytes
    unless a single record is larger."""
    parts: list[bytes] = []
    size = 0
    for r in records:
        field = _RECORDS_TAG + varint(len(r)) + r
        if parts and size + len(field) > limit:
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(field)
        size += len(field)
    if parts:
        yield b"".join(parts)


class Refused(StrataError):
    """Monitoring refused the batch as invalid: sending it again cannot succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class MonitoringSink:
    """Sends prediction log batches to MonitoringService.IngestPredictions (a synchronous channel:
    the prediction log's thread is the only caller). TLS follows the STRATA_TLS_* settings, as
    every client inside the platform; `token` is the bearer token presented (None: auth off)."""

    def __init__(self, address: str, token: str | None, rejected: FileSink, *, timeout: float = 10.0) -> None:
        self.address = address
        self.rejected = rejected
        self._timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel: grpc.Channel | None = None
        self._call: grpc.StreamUnaryMultiCallable | None = None

    def write(self, records: list[bytes]) -> int | None:
        """Raises Unavailable when monitoring cannot be reached or did not confirm the batch;
        returns how many records it refused as invalid (set aside in `rejected`)."""
        # A root span: the prediction log's thread is in no request's context. (No-op, nearly
        # free, with tracing off.)
        with _tracer.start_as_current_span(DELIVER_SPAN, context=Context(),
                                           attributes={"prediction_log.records": len(records)}) as span:
            try:
                self._send(records)
                return None
            except Refused as e:
                refused = self._isolate(records, e)
                span.set_attribute("prediction_log.refused", refused)
                return refused

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._call = None

    def _isolate(self, records: list[bytes], error: Refused) -> int:
        """Send the halves of a refused batch again, down to the records at fault (a half that is
        taken is stored: monitoring refuses a stream from its first invalid message on)."""
        if len(records) == 1:
            self.rejected.write(records)
            log.error("monitoring refused a prediction record; set aside",
                      extra={"fields": {"file": str(self.rejected.path), "error": error.message}})
            return 1
        refused = 0
        for half in (records[:len(records) // 2], records[len(records) // 2:]):
            try:
                self._send(half)
            except Refused as e:
                refused += self._isolate(half, e)
        return refused

    def _send(self, records: list[bytes]) -> None:
        too_big = next((i for i, r in enumerate(records) if len(r) > MAX_MESSAGE - 16), None)
        if too_big is not None:  # no channel carries it; refused here as monitoring would
            raise Refused(f"records[{too_big}]: {len(records[too_big])} bytes; a message holds at most {MAX_MESSAGE}")
        call = self._stub()
        try:
            call(messages(records), timeout=self._timeout, metadata=trace_metadata(self._metadata))
        except grpc.RpcError as e:
            code, details = e.code(), e.details()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise Refused(details or "invalid") from None
            # A fresh channel next time: a new connection is tried at once, instead of after
            # gRPC's reconnect backoff, which grows to minutes while a peer is down.
            self.close()
            raise Unavailable(f"monitoring at {self.address}: {code.name}: {details}") from None

    def _stub(self) -> grpc.StreamUnaryMultiCallable:
        if self._call is None:
            options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
            tls = ClientTLS.from_settings()
            self._channel = (grpc.secure_channel(self.address, tls.credentials(), options) if tls is not None
                             else grpc.insecure_channel(self.address, options))
            # No serializer: the messages are bytes already.
            self._call = self._channel.stream_unary(
                METHOD, request_serializer=None,
                response_deserializer=monitoring_pb2.IngestPredictionsResponse.FromString)
        return self._call
