"""Materialization: a view's latest row per entity, for event times in (start, end], from its
offline Parquet source (DuckDB) to the online store.

Incremental: without a start, a run continues where the last finished run of the view version
ended. Idempotent: the same range writes the same rows, and the online store's newer-event-wins
rule keeps a re-run from moving anything back in time. All-or-nothing validation: the whole
result is checked against the view's types and rules before the first row is written. The
statistics of the materialized rows (count, nulls, min/max/mean/std, quantiles, distinct) are
computed by DuckDB in the same pass and stored as the view version's reference profile.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import duckdb
import numpy as np
import pyarrow as pa
from sqlalchemy import insert, select
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as pb

from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.features import tables as t
from services.features.definitions import Definitions, ViewDef
from services.features.files import OfflineFiles
from services.features.online import FLOATS, INTS, OnlineStore, RowCodec
from services.features.serving import KEY_SEP, validate_rules

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
_DT = types_pb2.DataType


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Materializer:
    def __init__(self, db: Database, definitions: Definitions, store: OnlineStore,
                 files: OfflineFiles, chunk_rows: int = 50_000) -> None:
        self.db = db
        self.definitions = definitions
        self.store = store
        self.files = files
        self.chunk_rows = chunk_rows

    def last_end(self, view: str, version: int) -> int:
        with self.db.read() as c:
            return c.execute(select(t.materializations.c.end_us).where(
                t.materializations.c.view == view, t.materializations.c.version == version)
                .order_by(t.materializations.c.end_us.desc()).limit(1)).scalar_one_or_none() or 0

    def run(self, view_name: str, start_us: int = 0, end_us: int = 0) -> Iterator[pb.MaterializeResponse]:
        view = self.definitions.get_view(view_name)
        spec = view.spec
        if not spec.source.path or not spec.source.timestamp_field:
            raise FailedPrecondition(f"featureViews/{view_name} has no offline source (source.path and "
                                     "source.timestamp_field)")
        if start_us < 0 or end_us < 0:
            raise InvalidArgument("start_us" if start_us < 0 else "end_us", "must not be negative")
        start_us = start_us or self.last_end(spec.name, spec.version)
        end_us = end_us or int(time.time() * 1e6)
        if end_us <= start_us:
            raise InvalidArgument("end_us", f"the range ({start_us}, {end_us}] is empty")
        table = self._latest_rows(view, start_us, end_us)
        rows = table.num_rows
        keys, ts, columns, nulls = self._convert(view, table)  # validates everything first
        progress = pb.MaterializeResponse(rows_total=rows, start_us=start_us, end_us=end_us,
                                          view_version=spec.version)
        codec = RowCodec(spec)
        for begin in range(0, rows, self.chunk_rows):
            stop = min(rows, begin + self.chunk_rows)
            blobs = codec.encode(ts[begin:stop], {k: v[begin:stop] for k, v in columns.items()},
                                 {k: v[begin:stop] for k, v in nulls.items()})
            self.store.write(spec.name, spec.version, keys[begin:stop], blobs)
            progress.rows_written = stop
            yield progress
        stats = self._statistics(view, table, start_us, end_us)
        now = datetime.now(UTC)
        with self.db.session() as c:
            c.execute(t.materializations.delete().where(  # a re-run of the same range replaces its record
                t.materializations.c.view == spec.name, t.materializations.c.version == spec.version,
                t.materializations.c.end_us == end_us))
            c.execute(insert(t.materializations).values(view=spec.name, version=spec.version, start_us=start_us,
                                                         end_us=end_us, rows=rows, finish_time=now))
            c.execute(t.feature_statistics.delete().where(t.feature_statistics.c.view == spec.name,
                                                          t.feature_statistics.c.version == spec.version))
            c.execute(insert(t.feature_statistics).values(view=spec.name, version=spec.version,
                                                          stats=stats.SerializeToString(), compute_time=now))
        progress.done = True
        yield progress

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
            want_int = e.value_type == pb.VALUE_TYPE_INT64
            if want_int != pa.types.is_integer(col.type):
                raise InvalidArgument(f"source.{e.join_key}", f"entity {e.name} is keyed by "
                                      f"{pb.ValueType.Name(e.value_type)}; the source column is {col.type}")
            key_cols.append([str(v) for v in col.to_pylist()])
        keys = key_cols[0] if len(key_cols) == 1 else [KEY_SEP.join(p) for p in zip(*key_cols, strict=True)]
        ts = table.column("__event_us").to_numpy().astype(np.int64)
        columns, nulls = {}, {}
        for f in spec.features:
            col = table.column(f.name)
            null = col.is_null().to_numpy(zero_copy_only=False)
            if f.dtype == _DT.DATA_TYPE_STRING:
                if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                    raise InvalidArgument(f"source.{f.name}", f"feature '{f.name}' is STRING; the source column "
                                          f"is {col.type}")
                values = np.array(col.to_pylist(), dtype=object)
            else:
                ok = pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type)
                if not ok:
                    raise InvalidArgument(f"source.{f.name}", f"feature '{f.name}' is "
                                          f"{_DT.Name(f.dtype).removeprefix('DATA_TYPE_')}; the source column is "
                                          f"{col.type}")
                kind = np.float64 if f.dtype in FLOATS else np.int64 if f.dtype in INTS else np.bool_
                values = col.fill_null(0).to_numpy(zero_copy_only=False).astype(kind)
            validate_rules(f, values, null)
            columns[f.name], nulls[f.name] = values, null
        return keys, ts, columns, nulls

    @staticmethod
    def _statistics(view: ViewDef, table: pa.Table, start_us: int, end_us: int) -> pb.GetFeatureStatisticsResponse:
        spec = view.spec
        out = pb.GetFeatureStatisticsResponse(view_version=spec.version, start_us=start_us, end_us=end_us)
        out.compute_time.FromDatetime(datetime.now(UTC))
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
                    out.features.append(pb.FeatureStatistics(
                        name=f.name, count=n, nulls=nulls, min=lo or 0.0, max=hi or 0.0, mean=mean or 0.0,
                        std=std or 0.0, quantiles=quant or [], distinct=distinct or 0))
                else:
                    n, nulls, distinct = con.execute(
                        f"SELECT count(*), count(*) - count({c}), approx_count_distinct({c}) FROM rows").fetchone()
                    out.features.append(pb.FeatureStatistics(name=f.name, count=n, nulls=nulls, distinct=distinct))
        return out

    def statistics(self, view: str, version: int = 0) -> pb.GetFeatureStatisticsResponse:
        version = version or self.definitions.get_view(view).spec.version
        with self.db.read() as c:
            blob = c.execute(select(t.feature_statistics.c.stats).where(
                t.feature_statistics.c.view == view, t.feature_statistics.c.version == version)).scalar_one_or_none()
        if blob is None:
            raise NotFound(f"featureViews/{view}/versions/{version} has not been materialized yet")
        return pb.GetFeatureStatisticsResponse.FromString(blob)
