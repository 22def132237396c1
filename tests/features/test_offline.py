"""Point-in-time correctness of the offline store (services/features/offline.py), against real
Parquet files, plus a property test against a slow pure-Python reference."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.features.offline import OfflineStoreError, ViewSpec, historical_features, write_parquet

BASE = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
US = pa.timestamp("us", tz="UTC")


def T(seconds: float) -> dt.datetime:
    return BASE + dt.timedelta(seconds=seconds)


def source(path: Path, **cols: object) -> str:
    write_parquet(pa.table(cols), path)
    return str(path)


def view(src: str, name: str = "u", entities: tuple[str, ...] = ("user_id",),
         features: tuple[str, ...] = ("x",), created: str | None = None, ttl: int = 0) -> ViewSpec:
    return ViewSpec(name, entities, features, "ts", created, ttl, src)


def entities(users: list[int | None], times: list[dt.datetime | None], ts_type: pa.DataType = US,
             **extra: list) -> pa.Table:
    return pa.table({"user_id": pa.array(users, pa.int64()), "event_timestamp": pa.array(times, ts_type),
                     **extra})


def get(rows: pa.Table, views: list[ViewSpec], wanted: list[tuple[str, str]] | None = None,
        **kw: object) -> pa.Table:
    wanted = wanted or [(v.name, f) for v in views for f in v.features]
    return historical_features(rows, views, wanted, **kw)


@pytest.fixture()
def users(tmp_path: Path) -> str:
    """user 1: events at 10 s (x=1), 20 s (x=2), 30 s (x=None); user 2: event at 15 s (x=5)."""
    return source(tmp_path / "users.parquet", user_id=[1, 1, 1, 2],
                  ts=pa.array([T(10), T(20), T(30), T(15)], US), x=[1.0, 2.0, None, 5.0])


def test_before_first_event_at_event_between_and_unknown_key(users: str) -> None:
    rows = entities([1, 1, 1, 1, 2, 3, None, 2],
                    [T(5), T(10), T(19.999999), T(20), T(100), T(100), T(100), None])
    want = [None, 1.0, 1.0, 2.0, 5.0, None, None, None]  # a null key or time matches nothing
    assert get(rows, [view(users)]).column("u__x").to_pylist() == want
    assert get(rows, [view(users, ttl=1000)]).column("u__x").to_pylist() == want


def test_null_feature_in_matched_row_is_null_not_an_older_value(users: str) -> None:
    rows = entities([1, 1], [T(30), T(31)])
    assert get(rows, [view(users)]).column("u__x").to_pylist() == [None, None]


def test_ttl_expiry_and_inclusive_boundary(users: str) -> None:
    # ttl 5 s: the event at 20 s answers from 20 s up to and including 25 s, not 1 us later.
    rows = entities([1, 1, 1, 1, 2], [T(20), T(25), T(25.000001), T(29), T(20)])
    got = get(rows, [view(users, ttl=5)]).column("u__x").to_pylist()
    assert got == [2.0, 2.0, None, None, 5.0]
    # ttl never resurrects an older row when the latest one is expired
    assert get(entities([1], [T(29)]), [view(users, ttl=15)]).column("u__x").to_pylist() == [2.0]


def test_same_event_time_created_timestamp_decides(tmp_path: Path) -> None:
    src = source(tmp_path / "s.parquet", user_id=[1, 1, 1, 2, 2], ts=pa.array([T(10)] * 5, US),
                 created=pa.array([T(3), T(5), T(4), None, T(1)], US), x=[1.0, 2.0, 3.0, 4.0, 5.0])
    got = get(entities([1, 2], [T(10), T(11)]), [view(src, created="created")])
    assert got.column("u__x").to_pylist() == [2.0, 5.0]  # latest created; a null created loses


def test_same_event_and_created_time_position_decides(tmp_path: Path) -> None:
    # position = (file path order, row number): the later file wins, then the later row.
    d = tmp_path / "src"
    same = {"ts": pa.array([T(10)] * 2, US), "created": pa.array([T(1)] * 2, US)}
    source(d / "b.parquet", user_id=[1, 2], x=[10.0, 20.0], **same)
    source(d / "a.parquet", user_id=[1, 1], x=[11.0, 12.0], **same)
    source(d / "c.parquet", user_id=[3, 3], x=[31.0, 32.0], ts=pa.array([T(10)] * 2, US),
           created=pa.array([T(2), T(1)], US))
    got = get(entities([1, 2, 3], [T(10)] * 3), [view(str(d / "*.parquet"), created="created")])
    assert got.column("u__x").to_pylist() == [10.0, 20.0, 31.0]
    # without a created timestamp the position alone decides
    got = get(entities([1, 3], [T(10)] * 2), [view(str(d / "*.parquet"))])
    assert got.column("u__x").to_pylist() == [10.0, 32.0]


def test_created_timestamp_cutoff_hides_backfills_and_late_rows(tmp_path: Path) -> None:
    """filter_by_created_timestamp: a row counts only once created (a null created time: at its event),
    so a backfill written later never reaches earlier training rows; off, only the event time counts."""
    src = source(tmp_path / "s.parquet", user_id=[1, 1, 1, 2], ts=pa.array([T(10), T(20), T(60), T(5)], US),
                 created=pa.array([T(11), T(50), None, T(40)], US), x=[1.0, 2.0, 3.0, 4.0])
    times = [T(5), T(10), T(11), T(25), T(49), T(50), T(60)]
    rows = entities([1] * 7 + [2, 2], times + [T(39), T(40)])
    v = view(src, created="created")
    assert get(rows, [v]).column("u__x").to_pylist() == [None, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    assert get(rows, [v], filter_by_created_timestamp=True).column("u__x").to_pylist() == \
        [None, None, 1.0, 1.0, 1.0, 2.0, 3.0, None, 4.0]
    # ttl applies to the known winner: at 25 s the newest known value (10 s) is 15 s old, and the
    # newer row (20 s, created at 50 s) is not used in its place
    short = view(src, created="created", ttl=10)
    assert get(rows, [short], filter_by_created_timestamp=True).column("u__x").to_pylist() == \
        [None, None, 1.0, None, None, None, 3.0, None, None]
    # a view without a created column is unaffected
    plain = view(src)
    assert get(rows, [plain], filter_by_created_timestamp=True).equals(get(rows, [plain]))


def test_created_timestamp_cutoff_below_a_microsecond(tmp_path: Path) -> None:
    """A nanosecond created time against microsecond entity times is rounded up, never down."""
    ns = pa.timestamp("ns", tz="UTC")
    t20 = pa.scalar(T(20), US).cast(ns).value
    src = source(tmp_path / "s.parquet", user_id=[1], ts=pa.array([T(10)], US),
                 created=pa.array([t20 + 1], ns), x=[1.0])
    got = get(entities([1, 1], [T(20), T(20.000001)]), [view(src, created="created")],
              filter_by_created_timestamp=True)
    assert got.column("u__x").to_pylist() == [None, 1.0]


def test_several_views_with_different_entities_in_one_request(tmp_path: Path) -> None:
    u = source(tmp_path / "u.parquet", user_id=[1, 2], ts=pa.array([T(1), T(1)], US), x=[1.0, 2.0],
               n=pa.array([10, 20], pa.int32()))
    m = source(tmp_path / "m.parquet", merchant_id=["a", "b", "a"], ts=pa.array([T(1), T(1), T(5)], US),
               risk=["low", "high", "mid"])
    um = source(tmp_path / "um.parquet", user_id=[1, 1], merchant_id=["a", "b"],
                ts=pa.array([T(2), T(2)], US), spend=[7.5, 8.5], seen=[True, False])
    views = [view(u, "users", features=("x", "n")), view(m, "merchants", ("merchant_id",), ("risk",)),
             view(um, "pairs", ("user_id", "merchant_id"), ("spend", "seen"), ttl=10)]
    rows = entities([1, 2, 1, 1], [T(3), T(3), T(6), T(13)], merchant_id=["a", "b", "b", "a"])
    got = get(rows, views, [("pairs", "spend"), ("users", "n"), ("merchants", "risk"), ("users", "x"),
                            ("pairs", "seen")])
    assert got.column_names == ["user_id", "event_timestamp", "merchant_id", "pairs__spend", "users__n",
                                "merchants__risk", "users__x", "pairs__seen"]
    assert got.to_pydict() == {
        **rows.to_pydict(),
        "pairs__spend": [7.5, None, 8.5, None], "users__n": [10, 20, 10, 10],
        "merchants__risk": ["low", "high", "high", "mid"], "users__x": [1.0, 2.0, 1.0, 1.0],
        "pairs__seen": [True, None, False, None]}
    assert got.schema.field("users__n").type == pa.int32()  # typed as in the source
    assert got.schema.field("pairs__seen").type == pa.bool_()


def test_duplicate_rows_original_order_and_extra_columns_kept(users: str) -> None:
    times = [T(25), T(12), T(25), T(16), T(25), T(12)]
    rows = entities([1, 1, 1, 2, 1, 1], times, label=[0, 1, 2, 3, 4, 5],
                    note=pa.array(["a", None, "c", "d", "e", "f"], pa.large_string()))
    rows = pa.concat_tables([rows.slice(0, 2), rows.slice(2)])  # several chunks
    got = get(rows, [view(users)])
    assert got.slice(0, rows.num_rows).select(rows.column_names).equals(rows)
    assert got.schema.field("note").type == pa.large_string()
    assert got.column("u__x").to_pylist() == [2.0, 1.0, 2.0, 5.0, 2.0, 1.0]


def test_source_feature_types_are_kept(tmp_path: Path) -> None:
    src = source(tmp_path / "s.parquet", user_id=[1], ts=pa.array([T(1)], US),
                 f32=pa.array([1.5], pa.float32()), when=pa.array([T(0)], pa.timestamp("ms")),
                 tag=pa.array(["x"]).dictionary_encode(),
                 amount=pa.array([12345], pa.decimal128(10, 2)))
    got = get(entities([1, 2], [T(2), T(2)]), [view(src, features=("f32", "when", "tag", "amount"))])
    schema = pq.read_schema(src)
    for f in ("f32", "when", "tag", "amount"):
        assert got.schema.field(f"u__{f}").type == schema.field(f).type
    assert got.column("u__when").to_pylist() == [T(0).replace(tzinfo=None), None]
    assert got.column("u__tag").to_pylist() == ["x", None]


@pytest.mark.parametrize("entity_type", [pa.timestamp("us", tz="UTC"), pa.timestamp("ms", tz="Asia/Kolkata"),
                                         pa.timestamp("ns", tz="America/New_York"), pa.timestamp("s"),
                                         pa.timestamp("us"), pa.timestamp("ns")])
@pytest.mark.parametrize("source_type", [pa.timestamp("us", tz="UTC"), pa.timestamp("ms", tz="Europe/Paris"),
                                         pa.timestamp("us"), pa.timestamp("ns"),
                                         pa.timestamp("ns", tz="UTC")])
def test_timezone_aware_and_naive_timestamps(tmp_path: Path, entity_type: pa.DataType,
                                             source_type: pa.DataType) -> None:
    # naive means UTC; an aware value is its instant, whatever its zone
    src = source(tmp_path / "s.parquet", user_id=[1, 1], ts=pa.array([T(10), T(20)], US).cast(source_type),
                 x=[1.0, 2.0])
    times = pa.array([T(9), T(10), T(19), T(20)], US).cast(entity_type)
    rows = pa.table({"user_id": [1, 1, 1, 1], "event_timestamp": times})
    got = get(rows, [view(src, ttl=9)])
    assert got.column("u__x").to_pylist() == [None, 1.0, 1.0, 2.0]
    assert got.column("event_timestamp").equals(rows.column("event_timestamp"))


def test_no_leak_below_a_microsecond(tmp_path: Path) -> None:
    ns = pa.timestamp("ns", tz="UTC")
    t0 = pa.scalar(T(10), US).cast(ns).value
    src = source(tmp_path / "s.parquet", user_id=[1, 2], ts=pa.array([t0 + 500, t0], ns), x=[1.0, 2.0])
    # microsecond entity times against a nanosecond source: 10 s is before 10 s + 500 ns
    assert get(entities([1, 1], [T(10), T(10.000001)]), [view(src)]).column("u__x").to_pylist() == [None, 1.0]
    rows = pa.table({"user_id": [1, 1, 2, 2],
                     "event_timestamp": pa.array([t0 + 499, t0 + 500, t0 - 1, t0], ns)})
    assert get(rows, [view(src)]).column("u__x").to_pylist() == [None, 1.0, None, 2.0]
    # nanosecond entity times against a microsecond source, and a nanosecond ttl boundary
    src_us = source(tmp_path / "us.parquet", user_id=[1], ts=pa.array([T(10)], US), x=[1.0])
    rows = pa.table({"user_id": [1, 1, 1, 1], "event_timestamp": pa.array(
        [t0 - 1, t0, t0 + 5 * 10**9, t0 + 5 * 10**9 + 1], ns)})
    assert get(rows, [view(src_us, ttl=5)]).column("u__x").to_pylist() == [None, 1.0, 1.0, None]


def test_empty_entity_rows_and_no_features(users: str) -> None:
    empty = entities([], [])
    got = get(empty, [view(users)])
    assert got.num_rows == 0 and got.schema.field("u__x").type == pa.float64()
    rows = entities([1], [T(10)])
    assert historical_features(rows, [view(users)], []) is rows
    untyped = pa.table({"user_id": pa.nulls(2), "event_timestamp": pa.array([T(10)] * 2, US)})
    assert get(untyped, [view(users)]).column("u__x").to_pylist() == [None, None]  # an all-null key column


def test_threads_setting_gives_the_same_answer(users: str) -> None:
    rows = entities([1, 2, 1, 3] * 50, [T(i % 40) for i in range(200)])
    assert get(rows, [view(users)], threads=1).equals(get(rows, [view(users)], threads=2))


@pytest.mark.parametrize("case, match", [
    ("ts_not_timestamp", "'event_timestamp' must be a timestamp, got int64"),
    ("ts_missing", "lacks the timestamp column 'when'"),
    ("unknown_view", "unknown feature view 'nope'"),
    ("unknown_feature", "feature view 'u' has no feature 'nope'"),
    ("entity_missing", "entity_rows lacks column 'merchant_id', a join key of feature view 'm'"),
    ("key_type", "join key 'user_id' of feature view 'u': entity_rows has string, the source has int64"),
    ("no_file", "matches no file"),
    ("source_column", "lacks column 'y'"),
    ("source_ts_type", "column 'ts' of feature view 'bad' must be a timestamp, got int64"),
    ("duplicate_feature", "requested twice"),
    ("duplicate_view", "feature view 'u' is given twice"),
    ("name_clash", "already has a column 'u__x'"),
    ("negative_ttl", "ttl_seconds must be >= 0"),
    ("not_a_table", "must be a pyarrow.Table"),
    ("threads", "threads must be >= 1"),
])
def test_bad_input_is_rejected_with_a_named_problem(tmp_path: Path, users: str, case: str,
                                                    match: str) -> None:
    u = view(users)
    rows = entities([1], [T(10)])
    views, wanted, kw = [u], [("u", "x")], {}
    if case == "ts_not_timestamp":
        rows = pa.table({"user_id": [1], "event_timestamp": [1_700_000_000_000_000]})
    elif case == "ts_missing":
        kw = {"timestamp_column": "when"}
    elif case == "unknown_view":
        wanted = [("nope", "x")]
    elif case == "unknown_feature":
        wanted = [("u", "nope")]
    elif case == "entity_missing":
        views, wanted = [u, view(users, "m", ("merchant_id",))], [("u", "x"), ("m", "x")]
    elif case == "key_type":
        rows = pa.table({"user_id": ["1"], "event_timestamp": pa.array([T(10)], US)})
    elif case == "no_file":
        views = [view(str(tmp_path / "missing" / "*.parquet"))]
    elif case == "source_column":
        views = [view(users, features=("x", "y"))]
        wanted = [("u", "y")]
    elif case == "source_ts_type":
        views = [view(source(tmp_path / "bad.parquet", user_id=[1], ts=[5], x=[1.0]), "bad")]
        wanted = [("bad", "x")]
    elif case == "duplicate_feature":
        wanted = [("u", "x"), ("u", "x")]
    elif case == "duplicate_view":
        views = [u, u]
    elif case == "name_clash":
        rows = rows.append_column("u__x", pa.array([0.0]))
    elif case == "negative_ttl":
        views = [view(users, ttl=-1)]
    elif case == "not_a_table":
        rows = rows.to_pylist()  # type: ignore[assignment]
    elif case == "threads":
        kw = {"threads": 0}
    with pytest.raises(OfflineStoreError, match=match):
        historical_features(rows, views, wanted, **kw)  # type: ignore[arg-type]


def test_write_parquet_is_atomic_and_returns_the_file_hash(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "t.parquet"
    table = pa.table({"a": [1, 2, 3]})
    digest = write_parquet(table, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert pq.read_table(path).equals(table)
    assert [p.name for p in path.parent.iterdir()] == ["t.parquet"]  # no temp file left behind
    with pytest.raises(Exception):
        write_parquet("not a table", path)  # type: ignore[arg-type]
    assert pq.read_table(path).equals(table) and [p.name for p in path.parent.iterdir()] == ["t.parquet"]


# --- property test: historical_features == a slow, obviously correct reference ---------------------------

UNITS = [pa.timestamp(u, tz=tz) for u in ("s", "ms", "us", "ns") for tz in (None, "UTC", "Asia/Tokyo")]
# Few keys and a few seconds of time, so that ties, ttl boundaries and cross-file duplicates are common.
source_row = st.fixed_dictionaries({
    "user_id": st.sampled_from([0, 1, 1, 1, None]),
    "merchant_id": st.sampled_from(["a", "b"]),
    "ts": st.sampled_from([0, 1, 2, 2, 3, 3, None]),
    "created": st.sampled_from([None, 0, 1, 1, 2, 4]),  # 2, 4: often created after the event
    "x_null": st.booleans(),
    "file": st.sampled_from([0, 1, 2]),  # which of three files the row is written to
})
entity_row = st.fixed_dictionaries({
    "user_id": st.sampled_from([0, 1, 1, 1, 2, None]),
    "merchant_id": st.sampled_from(["a", "b", "c"]),
    "ts": st.sampled_from([-1, 0, 1, 2, 3, 3, 4, 5, None]),
})


def reference(src: list[dict], rows: list[dict], keys: tuple[str, ...], ttl: int, created: bool,
              feature: str, cutoff: bool = False) -> list[object]:
    """Per entity row: loop over every source row, keep the candidates, take the max by the tie order.
    With `cutoff`, a candidate must also have been created by the row's time (null: at its event)."""
    out = []
    for e in rows:
        best, best_rank = None, None
        for i, s in enumerate(src):
            if e["ts"] is None or any(e[k] is None or e[k] != s[k] for k in keys):
                continue
            if s["ts"] is None or not (s["ts"] <= e["ts"] and (ttl == 0 or s["ts"] >= e["ts"] - ttl)):
                continue
            if cutoff and created and (s["ts"] if s["created"] is None else s["created"]) > e["ts"]:
                continue
            c = s["created"] if created else None
            rank = (s["ts"], c is not None, c or 0, s["file"], i)  # i: the row's order inside its file
            if best_rank is None or rank > best_rank:
                best, best_rank = s, rank
        out.append(None if best is None else best[feature])
    return out

# STRATA_HYPOTHESIS_EXAMPLES=1500 for a deeper run than CI's (about a minute).

@settings(max_examples=int(os.environ.get("STRATA_HYPOTHESIS_EXAMPLES", "60")), deadline=None)
@given(src=st.lists(source_row, min_size=10, max_size=30), rows=st.lists(entity_row, min_size=5, max_size=30),
       src_type=st.sampled_from(UNITS), ent_type=st.sampled_from(UNITS), ttl_u=st.sampled_from([0, 1, 2]),
       ttl_p=st.sampled_from([0, 3]), cutoff=st.booleans())
def test_matches_reference(src: list[dict], rows: list[dict], src_type: pa.DataType, ent_type: pa.DataType,
                           ttl_u: int, ttl_p: int, cutoff: bool) -> None:
    for i, s in enumerate(src):  # values name their row, so a wrong match shows which row won
        s["x"] = None if s["x_null"] else float(i)
        s["n"] = i * 10

    def ts(values: list[int | None], typ: pa.DataType) -> pa.Array:
        secs = [None if v is None else 1_700_000_000 + v for v in values]
        return pa.array(secs, pa.int64()).cast(pa.timestamp("s", tz=typ.tz)).cast(typ)

    with tempfile.TemporaryDirectory() as d:
        for f in range(3):  # every file is written, an empty one too
            part = [s for s in src if s["file"] == f]
            write_parquet(pa.table({
                "user_id": pa.array([s["user_id"] for s in part], pa.int64()),
                "merchant_id": pa.array([s["merchant_id"] for s in part], pa.string()),
                "ts": ts([s["ts"] for s in part], src_type),
                "created": ts([s["created"] for s in part], src_type),
                "x": pa.array([s["x"] for s in part], pa.float64()),
                "n": pa.array([s["n"] for s in part], pa.int64()),
            }), Path(d) / f"part-{f}.parquet")
        glob = str(Path(d) / "*.parquet")
        views = [ViewSpec("u", ("user_id",), ("x", "n"), "ts", "created", ttl_u, glob),
                 ViewSpec("p", ("user_id", "merchant_id"), ("x",), "ts", None, ttl_p, glob)]
        table = pa.table({"user_id": pa.array([r["user_id"] for r in rows], pa.int64()),
                          "merchant_id": pa.array([r["merchant_id"] for r in rows], pa.string()),
                          "event_timestamp": ts([r["ts"] for r in rows], ent_type)})
        got = historical_features(table, views, [("u", "x"), ("p", "x"), ("u", "n")], threads=2,
                                  filter_by_created_timestamp=cutoff)

    assert got.column_names == ["user_id", "merchant_id", "event_timestamp", "u__x", "p__x", "u__n"]
    assert got.select(table.column_names).equals(table)
    assert got.column("u__x").to_pylist() == reference(src, rows, ("user_id",), ttl_u, True, "x", cutoff)
    assert got.column("u__n").to_pylist() == reference(src, rows, ("user_id",), ttl_u, True, "n", cutoff)
    assert got.column("p__x").to_pylist() == reference(src, rows, ("user_id", "merchant_id"), ttl_p,
                                                       False, "x", cutoff)
