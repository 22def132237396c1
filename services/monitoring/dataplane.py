"""The monitoring service's one facade: what the servicer calls, with plain types. It decides
what runs on the event loop (nothing that blocks) and what in a worker thread (decoding and
writing a batch, fsync, SQL, DuckDB, the reports)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import TypeVar

from services.common.errors import InvalidArgument
from services.common.timeutil import utc_now
from services.monitoring import prom_metrics, reports
from services.monitoring.labels import GroundTruthStore
from services.monitoring.references import ReferenceStore
from services.monitoring.rows import arrow_table, in_message, records_table
from services.monitoring.store import PredictionStore
from services.monitoring.types import (
    ArrowBatch, DriftQuery, DriftReport, IngestResult, Label, PerformanceQuery, PerformanceReport, QualityQuery,
    QualityReport, RecordGroup, Reference, ReferenceRequest,
)

Batch = list[RecordGroup] | ArrowBatch
M = TypeVar("M")


class MonitoringDataPlane:
    def __init__(self, predictions: PredictionStore, references: ReferenceStore, labels: GroundTruthStore,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.predictions = predictions
        self.references = references
        self.labels = labels
        self.clock = clock
        prom_metrics.watch(predictions.db)  # open alerts and stored rows, read at each scrape

    async def ingest(self, messages: AsyncIterator[M], decode: Callable[[M], Batch]) -> IngestResult:
        """Store a stream's batches; returns once every row is durable (see store.py). The transport
        hands each message over with the function that turns it into a batch, so that the decoding
        runs off the event loop too."""
        received = stored = 0
        index = 0
        async for message in messages:
            n, new = await asyncio.to_thread(self._append, decode, message, index)
            received += n
            stored += new
            index += 1
        await asyncio.to_thread(self.predictions.sync)
        return IngestResult(received, stored)

    def _append(self, decode: Callable[[M], Batch], message: M, index: int) -> tuple[int, int]:
        try:
            batch = decode(message)
            if isinstance(batch, ArrowBatch):
                tables = [(arrow_table(batch), "arrow_ipc")]
            else:
                tables = [(records_table(g), "records") for g in batch]
            return sum(t.num_rows for t, _ in tables), self.predictions.append(tables)
        except InvalidArgument as e:
            raise in_message(e, index) from None

    async def report_ground_truth(self, labels: Sequence[Label], principal: str) -> int:
        return await asyncio.to_thread(self.labels.report, labels, principal)

    async def set_reference(self, req: ReferenceRequest, principal: str) -> Reference:
        return await asyncio.to_thread(self.references.set, req, principal)

    async def get_reference(self, model: str, version: int) -> Reference:
        return await asyncio.to_thread(self.references.get, model, version)

    async def drift(self, q: DriftQuery) -> DriftReport:
        report = await asyncio.to_thread(reports.drift, self.predictions, self.references, q, self.clock())
        prom_metrics.drift_computed(q, report)
        return report

    async def drift_html(self, q: DriftQuery) -> str:
        return await asyncio.to_thread(reports.drift_html, self.predictions, self.references, q, self.clock())

    async def quality(self, q: QualityQuery) -> QualityReport:
        return await asyncio.to_thread(reports.quality, self.predictions, self.references, q, self.clock())

    async def performance(self, q: PerformanceQuery) -> PerformanceReport:
        return await asyncio.to_thread(reports.performance, self.predictions, self.references, self.labels, q,
                                       self.clock())
