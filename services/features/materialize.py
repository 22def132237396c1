"""Materialization: a view's latest row per entity, for event times in (start, end], from its
offline Parquet source (DuckDB) to the online store.

Incremental: without a start, a run continues where the last finished run of the view version
ended. Idempotent: the same range writes the same rows, and the online store's newer-event-wins
rule keeps a re-run from moving anything back in time. All-or-nothing validation: the whole
result is checked against the view's types and rules before the first row is written. The
statistics of the materialized rows (count, nulls, min/max/mean/std, quantiles, distinct) are
computed by DuckDB in the same pass and kept with the run; the newest run that found rows is the
view version's reference profile (a run that found nothing never replaces it). The newest
`keep_runs` runs with rows are kept, and the run where the next incremental one starts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import duckdb
import numpy as np
import pyarrow as pa
from sqlalchemy import and_, delete, insert, select

from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.timeutil import as_utc
from services.features import prom_metrics
from services.features import tables as t
from services.features.definitions import Definitions, ViewDef
from services.features.files import OfflineFiles
from services.features.online import FLOATS, INTS, OnlineStore, RowCodec
from services.features.online_serving import DEFAULT_MAX_FUTURE_SKEW_SECONDS, KEY_SEP, validate_rules
from services.features.records import statistics_from_json, statistics_json
from services.features.types import DataType, FeatureStatistics, MaterializeProgress, Statistics, ValueType, type_name

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Run:
    """One finished materialization of a view version."""

    start_us: int
    end_us: int
    rows: int
    finish_time: datetime
    has_statistics: bool


class Materializer:
    def __init__(self, db: Database, definitions: Definitions, store: OnlineStore,
                 files: OfflineFiles, chunk_rows: int = 50_000, keep_runs: int = 100,
                 max_future_skew_seconds: float = DEFAULT_MAX_FUTURE_SKEW_SECONDS) -> None:
        """`max_future_skew_seconds`: how far past this service's clock a run may end (an end in
        the far future would be recorded as the next incremental start and leave every later
        run empty, and carry rows stamped in the future online)."""
        self.max_future_skew_us = int(max_future_skew_seconds * 1e6)
        self.db = db
        self.definitions = definitions
        self.store = store
        self.files = files
        self.chunk_rows = chunk_rows
        self.keep_runs = keep_runs  # runs with statistics kept per view version

    def last_end(self, view: str, version: int) -> int:
        with self.db.read() as c:
            return c.execute(select(t.materializations.c.end_us).where(
                t.materializations.c.view == view, t.materializations.c.version == version)
                .order_by(t.materializations.c.end_us.desc()).limit(1)).scalar_one_or_none() or 0

    def run(self, view_name: str, start_us: int = 0, end_us: int = 0) -> Iterator[MaterializeProgress]:
        view = self.definitions.get_view(view_name)
        spec = view.spec
        if not spec.source.path or not spec.source.timestamp_field:
            raise FailedPrecondition(f"featureViews/{view_name} has no offline source (source.path and "
                                     "source.timestamp_field)")
        if start_us < 0 or end_us < 0:
            raise InvalidArgument("start_us" if start_us < 0 else "end_us", "must not be negative")
        now_us = int(time.time() * 1e6)
        if end_us > now_us + self.max_future_skew_us:
            raise InvalidArgument("end_us", f"{end_us} is more than {self.max_future_skew_us // 1_000_000} s "
                                  "past the service's clock")
        start_us = start_us or self.last_end(spec.name, spec.version)
        end_us = end_us or now_us
        if end_us <= start_us:
            raise InvalidArgument("end_us", f"the range ({start_us}, {end_us}] is empty")
        table = self._latest_rows(view, start_us, end_us)
        rows = table.num_rows
        keys, ts, columns, nulls = self._convert(view, table)  # validates everything first
        progress = MaterializeProgress(rows_total=rows, start_us=start_us, end_us=end_us,
                                       view_version=spec.version)
        codec = RowCodec(spec)
        for begin in range(0, rows, self.chunk_rows):
            stop = min(rows, begin + self.chunk_rows)
            blobs = codec.encode(ts[begin:stop], {k: v[begin:stop] for k, v in columns.items()},
                                 {k: v[begin:stop] for k, v in nulls.items()})
            self.store.write(spec.name, spec.version, keys[begin:stop], blobs)
            progress = replace(progress, rows_written=stop)
            yield progress
        # Nothing found: nothing to describe. The run is recorded (the next one starts after it)
        # without statistics, so the last real profile stays the one served.
        stats = statistics_json(self._statistics(view, table, start_us, end_us)) if rows else None
        self._record(spec.name, spec.version, start_us, end_us, rows, stats)
        prom_metrics.materialized(spec.name, end_us, rows)
        yield replace(progress, done=True)

    def _record(self, view: str, version: int, start_us: int, end_us: int, rows: int,
                stats: str | None) -> None:
        m = t.materializations.c
        now = datetime.now(UTC)
        this = and_(m.view == view, m.version == version)
        with self.db.session() as c:
            same_range = and_(this, m.end_us == end_us)
            if stats is None and c.execute(select(m.end_us).where(same_range)).first() is not None:
                return  # an empty re-run of a range never replaces what an earlier run of it found
            c.execute(delete(t.materializations).where(same_range))  # a re-run of a range replaces its record
            c.execute(insert(t.materializations).values(view=view, version=version, start_us=start_us,
                                                        end_us=end_us, rows=rows, finish_time=now, stats=stats))
            # Bounded: the newest keep_runs runs with statistics, and the run with the largest end
            # (where the next incremental run starts); empty runs carry nothing else.
            kept = select(m.end_us).where(this, m.stats.is_not(None)).order_by(
                m.finish_time.desc(), m.end_us.desc()).limit(self.keep_runs)
            last = select(m.end_us).where(this).order_by(m.end_us.desc()).limit(1)
            keep = [*c.execute(kept).scalars(), *c.execute(last).scalars()]
            c.execute(delete(t.materializations).where(this, m.end_us.not_in(keep)))

    def runs(self, view: str, version: int = 0) -> list[Run]:
        """The kept runs of a view version (default: the current one), newest first."""
        version = version or self.definitions.get_view(view).spec.version
        m = t.materializations.c
        with self.db.read() as c:
            rows = c.execute(select(m.start_us, m.end_us, m.rows, m.finish_time, m.stats.is_not(None))
                             .where(m.view == view, m.version == version)
                             .order_by(m.finish_time.desc(), m.end_us.desc())).all()
        return [Run(r[0], r[1], r[2], as_utc(r[3]), bool(r[4])) for r in rows]

    def _latest_rows(self, view: ViewDef, start_us: int, end_us: int) -> pa.Table:
        spec = view.spec
        src = self.files.source(spec.source.path, "source.path")
        keys = ", ".join(_q(k) for k in view.join_keys)
        feats = ", ".join(_q(f.name) for f in spec.features)
        ts = _q(spec.source.timestamp_field)
        order = f"{ts} DESC" + (f", {_q(spec.source.created_timestamp_field)} DESC NULLS LAST"
                                if spec.source.created_timestamp_field else "")
        sql = (f"SELECT {keys}, {feats}, epoch_us({ts}::TIMESTAMP) AS __event_us FROM read_parquet(?) "
               f"WHERE epoch_us({ts}::TIMESTAMP) > ? AND epoch_us({ts}::TIMESTAMP) <= ? "
               f"QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY {order}) = 1")
        try:
            with duckdb.connect() as con:
                return con.sql(sql, params=[src, start_us, end_us]).to_arrow_table()
        except duckdb.Error as e:
            raise FailedPrecondition(f"featureViews/{spec.name}: reading source {spec.source.path} failed: "
                                     f"{str(e).splitlines()[0]}") from None

    @staticmethod
    def _convert(view: ViewDef, table: pa.Table) -> tuple[list[str], np.ndarray, dict, dict]:
        spec = view.spec
        key_cols = []
        for e in view.entities:
            col = table.column(e.join_key)
            want_int = e.value_type == ValueType.INT64
            if want_int != pa.types.is_integer(col.type):
                raise InvalidArgument(f"source.{e.join_key}", f"entity {e.name} is keyed by "
                                      f"VALUE_TYPE_{ValueType(e.value_type).name}; the source column is {col.type}")
            key_cols.append([str(v) for v in col.to_pylist()])
        keys = key_cols[0] if len(key_cols) == 1 else [KEY_SEP.join(p) for p in zip(*key_cols, strict=True)]
        ts = table.column("__event_us").to_numpy().astype(np.int64)
        columns, nulls = {}, {}
        for f in spec.features:
            col = table.column(f.name)
            null = col.is_null().to_numpy(zero_copy_only=False)
            if f.dtype == DataType.STRING:
                if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                    raise InvalidArgument(f"source.{f.name}", f"feature '{f.name}' is STRING; the source column "
                                          f"is {col.type}")
                values = np.array(col.to_pylist(), dtype=object)
            else:
                ok = pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)
                if not ok:
                    raise InvalidArgument(f"source.{f.name}", f"feature '{f.name}' is "
                                          f"{type_name(f.dtype)}; the source column is {col.type}")
                kind = np.float64 if f.dtype in FLOATS else np.int64 if f.dtype in INTS else np.bool_
                values = col.fill_null(0).to_numpy(zero_copy_only=False).astype(kind)
            validate_rules(f, values, null)
            columns[f.name], nulls[f.name] = values, null
        return keys, ts, columns, nulls

    @staticmethod
    def _statistics(view: ViewDef, table: pa.Table, start_us: int, end_us: int) -> Statistics:
        spec = view.spec
        features = []
        compute_time = datetime.now(UTC)
        with duckdb.connect() as con:
            con.register("rows", table)
            for f in spec.features:
                c = _q(f.name)
                if f.dtype in FLOATS | INTS:
                    qs = ", ".join(str(q) for q in QUANTILES)
                    row = con.execute(f"SELECT count(*), count(*) - count({c}), min({c}), max({c}), avg({c}), "
                                      f"stddev_pop({c}), quantile_cont({c}, [{qs}]), approx_count_distinct({c}) "
                                      "FROM rows").fetchone()
                    n, nulls, lo, hi, mean, std, quant, distinct = row
                    features.append(FeatureStatistics(
                        name=f.name, count=n, nulls=nulls, min=float(lo or 0.0), max=float(hi or 0.0),
                        mean=float(mean or 0.0), std=float(std or 0.0), quantiles=tuple(map(float, quant or ())),
                        distinct=distinct or 0))
                else:
                    n, nulls, distinct = con.execute(
                        f"SELECT count(*), count(*) - count({c}), approx_count_distinct({c}) FROM rows").fetchone()
                    features.append(FeatureStatistics(name=f.name, count=n, nulls=nulls, distinct=distinct))
        return Statistics(view_version=spec.version, compute_time=compute_time, start_us=start_us, end_us=end_us,
                          features=tuple(features))

    def statistics(self, view: str, version: int = 0) -> Statistics:
        """The statistics of the newest run of the view version that found rows."""
        version = version or self.definitions.get_view(view).spec.version
        m = t.materializations.c
        with self.db.read() as c:
            blob = c.execute(select(m.stats).where(m.view == view, m.version == version, m.stats.is_not(None))
                             .order_by(m.finish_time.desc(), m.end_us.desc()).limit(1)).scalar_one_or_none()
        if blob is None:
            raise NotFound(f"featureViews/{view}/versions/{version} has no statistics yet: no materialization "
                           "of it has found rows")
        return statistics_from_json(blob)
