"""Ground truth: the observed outcome of a prediction, reported by its id hours or days later,
kept in SQL (`monitoring_ground_truth`, one row per prediction id) and joined to the predictions
when performance is asked for.

A report is all or nothing: every id must name a stored prediction (in a Parquet file or still in
the write-ahead log), else the first unknown one is INVALID_ARGUMENT naming
`labels[i].prediction_id` and nothing is written. A label reported again for an id replaces the
earlier one (a corrected outcome). A prediction id that several rows share -- the same request
scored by an endpoint's version and by its shadow -- has one outcome, which both rows get.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyarrow as pa
from sqlalchemy import select

from services.common.db import Database
from services.common.errors import InvalidArgument, quote
from services.common.timeutil import utc_now
from services.monitoring import tables as t
from services.monitoring.rows import MAX_ID_CHARS
from services.monitoring.store import PredictionStore
from services.monitoring.types import Label

#: Labels in one report, at most.
MAX_LABELS = 100_000
#: A category's length, at most.
MAX_CATEGORY_CHARS = 1024
#: Ids per SQL statement when labels are looked up.
LOOKUP_CHUNK = 5_000


class GroundTruthStore:
    def __init__(self, db: Database, predictions: PredictionStore) -> None:
        self.db = db
        self.predictions = predictions

    def report(self, labels: Sequence[Label], principal: str) -> int:
        """Store the labels (all or none); returns how many."""
        if not labels:
            raise InvalidArgument("labels", "is empty")
        if len(labels) > MAX_LABELS:
            raise InvalidArgument("labels", f"holds {len(labels)} labels; at most {MAX_LABELS} in one report")
        first: dict[str, int] = {}
        for i, label in enumerate(labels):
            field = f"labels[{i}]"
            pid = label.prediction_id
            if not pid or len(pid) > MAX_ID_CHARS:
                raise InvalidArgument(f"{field}.prediction_id", f"must be 1 to {MAX_ID_CHARS} characters")
            if pid in first:
                raise InvalidArgument(f"{field}.prediction_id", f"{quote(pid)} is also labels[{first[pid]}]")
            first[pid] = i
            if (label.number is None) == (label.category is None):
                raise InvalidArgument(f"{field}.value", "give a number or a category")
            if label.number is not None and not math.isfinite(label.number):
                raise InvalidArgument(f"{field}.number", f"must be finite; got {label.number}")
            if label.category is not None and not 0 < len(label.category) <= MAX_CATEGORY_CHARS:
                raise InvalidArgument(f"{field}.category", f"must be 1 to {MAX_CATEGORY_CHARS} characters")
        stored = self.predictions.stored_ids(list(first))
        if len(stored) < len(first):
            unknown = [i for pid, i in first.items() if pid not in stored]
            i = unknown[0]
            raise InvalidArgument(f"labels[{i}].prediction_id",
                                  f"{quote(labels[i].prediction_id)} names no stored prediction ({len(unknown)} of "
                                  f"the {len(first)} ids are unknown); nothing was stored")
        now = utc_now()
        rows = [{"prediction_id": x.prediction_id, "number": x.number, "category": x.category,
                 "time": x.time or now, "report_time": now, "reported_by": principal} for x in labels]
        with self.db.session() as c:
            for start in range(0, len(rows), LOOKUP_CHUNK):
                self.db.upsert(c, t.ground_truth, rows[start:start + LOOKUP_CHUNK], ["prediction_id"])
        return len(rows)

    def lookup(self, ids: Sequence[str]) -> pa.Table:
        """The labels of those `ids` that have one: prediction_id, number, category."""
        g = t.ground_truth.c
        found: list[tuple[str, float | None, str | None]] = []
        unique = list(dict.fromkeys(ids))
        with self.db.read() as c:
            for start in range(0, len(unique), LOOKUP_CHUNK):
                chunk = unique[start:start + LOOKUP_CHUNK]
                found += c.execute(select(g.prediction_id, g.number, g.category).where(
                    g.prediction_id.in_(chunk))).all()
        return pa.table({"prediction_id": pa.array([r[0] for r in found], pa.string()),
                         "number": pa.array([r[1] for r in found], pa.float64()),
                         "category": pa.array([r[2] for r in found], pa.string())})
