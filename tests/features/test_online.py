"""The online store through OnlineFeatures, the same suite on SQLite and on the real Redis. Answers
are checked as the servicer sends them (convert.py; raw ones written by wire.py) and the client
parses them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from strata.features.v1 import features_pb2 as pb

from services.common.errors import InvalidArgument, NotFound
from services.features import convert, wire
from services.features.definitions import Definitions
from services.features.online import OnlineStore
from services.features.online_serving import DEFAULT_MAX_FUTURE_SKEW_SECONDS, OnlineFeatures, OnlineRows, ViewCache
from services.features.types import (
    EntityColumn, Feature, FeatureSet, FeatureStatus, FeatureValues, FeatureView, OnlineQuery, PushRequest, PushResult,
)
from tests.features.conftest import BOOL, F64, I64, STR, apply_basics, user_view

NOW = 1_800_000_000.0  # the fake clock: seconds since the epoch
US = 1_000_000
P, MISSING, EXPIRED, NULL = (FeatureStatus.PRESENT, FeatureStatus.NOT_FOUND, FeatureStatus.EXPIRED,
                             FeatureStatus.NULL_VALUE)


_LOOP = asyncio.new_event_loop()  # one loop for the module: the Redis store keeps one connection per loop


@pytest.fixture(scope="module", autouse=True)
def _loop() -> Iterator[None]:
    yield
    _LOOP.run_until_complete(asyncio.sleep(0))  # let closed connections finish closing
    _LOOP.close()


def _answer(read: OnlineRows) -> pb.GetOnlineFeaturesResponse:
    """The answer as the servicer sends it and a client parses it."""
    out = convert.online_response(read)
    return pb.GetOnlineFeaturesResponse.FromString(out) if isinstance(out, bytes) else out


def get_online(server: OnlineFeatures, request: OnlineQuery) -> pb.GetOnlineFeaturesResponse:
    """The blocking read, and where the store reads on the event loop, the async one too: both
    must give the same response or the same error."""
    try:
        resp = _answer(server.read(request))
    except Exception as e:
        if server.store.async_reads:
            with pytest.raises(type(e)) as err:
                _LOOP.run_until_complete(server.read_async(request))
            assert str(err.value) == str(e)
        raise
    if server.store.async_reads:
        assert _answer(_LOOP.run_until_complete(server.read_async(request))) == resp
    return resp


@pytest.fixture()
def server(online_store: OnlineStore, tmp_path) -> OnlineFeatures:  # noqa: ANN001
    from services.common.db import Database
    from services.features.app import MIGRATIONS
    db = Database(f"sqlite:///{tmp_path / 'defs.db'}")
    db.migrate(MIGRATIONS)
    d = Definitions(db)
    apply_basics(d)
    d.apply_view(user_view(ttl=3600), "t")
    d.apply_view(FeatureView(name="merchant_risk", entities=["merchant"], features=[
        Feature(name="chargeback_rate", dtype=F64)]), "t")
    return OnlineFeatures(ViewCache(d), online_store, clock=lambda: NOW)


def push_users(server: OnlineFeatures, ids: list[int], spend: list[float], *, ts: float = NOW - 60,
               segment: list[str] | None = None, null_spend: list[int] = ()) -> PushResult:
    n = len(ids)
    statuses = [NULL if i in null_spend else P for i in range(n)]
    return server.push(PushRequest(
        view="user_stats", entities={"user_id": EntityColumn(int64_values=ids)},
        event_timestamps_us=[int(ts * US)] * n, features=[
            FeatureValues(name="spend_7d", double_values=spend, statuses=statuses),
            FeatureValues(name="orders_7d", int64_values=[i * 2 for i in range(n)]),
            FeatureValues(name="segment", string_values=segment or ["vip"] * n),
            FeatureValues(name="active", bool_values=[i % 2 == 0 for i in range(n)])]))


def read(server: OnlineFeatures, features: list[str], users: list[int] = (), merchants: list[str] = ()) -> dict:
    entities = {}
    if users:
        entities["user_id"] = EntityColumn(int64_values=list(users))
    if merchants:
        entities["merchant_id"] = EntityColumn(string_values=list(merchants))
    resp = get_online(server, OnlineQuery(features=features, entities=entities))
    return {c.name: c for c in resp.features}


def test_values_statuses_and_freshness(server: OnlineFeatures) -> None:
    assert push_users(server, [1, 2, 3], [10.5, 20.0, 0.0], null_spend=[2]).rows_written == 3
    cols = read(server, ["user_stats:spend_7d", "user_stats:segment", "user_stats:orders_7d", "user_stats:active"],
                users=[3, 1, 99, 2])
    spend = cols["user_stats:spend_7d"]
    assert list(spend.statuses) == [NULL, P, MISSING, P]  # a missing value is never a silent zero
    assert list(spend.double_values)[1] == 10.5 and list(spend.double_values)[3] == 20.0
    assert list(spend.event_timestamps_us) == [int((NOW - 60) * US)] * 2 + [0, int((NOW - 60) * US)]
    assert list(cols["user_stats:segment"].string_values)[:2] == ["vip", "vip"]
    assert list(cols["user_stats:orders_7d"].int64_values) == [4, 0, 0, 2]
    assert list(cols["user_stats:active"].bool_values) == [True, True, False, False]


def test_ttl_is_honoured(server: OnlineFeatures) -> None:
    push_users(server, [1], [5.0], ts=NOW - 3599)
    push_users(server, [2], [6.0], ts=NOW - 3601)
    assert list(read(server, ["user_stats:spend_7d"], users=[1, 2])["user_stats:spend_7d"].statuses) == [P, EXPIRED]


def test_older_rows_never_replace_newer_ones(server: OnlineFeatures) -> None:
    push_users(server, [1], [5.0], ts=NOW - 10)
    push_users(server, [1], [1.0], ts=NOW - 20)  # late, older event
    assert list(read(server, ["user_stats:spend_7d"], users=[1])["user_stats:spend_7d"].double_values) == [5.0]
    push_users(server, [1], [7.0], ts=NOW - 5)
    assert list(read(server, ["user_stats:spend_7d"], users=[1])["user_stats:spend_7d"].double_values) == [7.0]


def test_many_entities_two_views_one_call(server: OnlineFeatures) -> None:
    ids = list(range(1, 101))
    push_users(server, ids, [float(i) for i in ids])
    server.push(PushRequest(view="merchant_risk", entities={
        "merchant_id": EntityColumn(string_values=[f"m{i}" for i in ids])},
        event_timestamps_us=[int(NOW * US)] * 100,
        features=[FeatureValues(name="chargeback_rate", double_values=[i / 1000 for i in ids])]))
    cols = read(server, ["user_stats:spend_7d", "merchant_risk:chargeback_rate"], users=ids,
                merchants=[f"m{i}" for i in ids])
    assert list(cols["user_stats:spend_7d"].double_values) == [float(i) for i in ids]
    assert list(cols["merchant_risk:chargeback_rate"].double_values) == [i / 1000 for i in ids]


@pytest.mark.parametrize("kw, field, message", [
    ({"spend": [1.0, -5.0, 2.0]}, "rows[1].spend_7d", "-5.0 is below the minimum 0"),
    ({"segment": ["vip", "gold", "new"]}, "rows[1].segment", "'gold' is not an allowed value"),
])
def test_a_bad_batch_is_refused_whole(server: OnlineFeatures, kw: dict, field: str, message: str) -> None:
    args = {"spend": [1.0, 2.0, 3.0], **kw}
    with pytest.raises(InvalidArgument) as err:
        push_users(server, [1, 2, 3], args["spend"], segment=kw.get("segment"))
    assert err.value.field == field and message in err.value.message
    statuses = read(server, ["user_stats:spend_7d"], users=[1, 2, 3])["user_stats:spend_7d"].statuses
    assert list(statuses) == [MISSING] * 3  # nothing of the batch was written


def test_bad_requests(server: OnlineFeatures) -> None:
    with pytest.raises(InvalidArgument, match="has no feature 'nope'"):
        read(server, ["user_stats:nope"], users=[1])
    with pytest.raises(NotFound, match="featureViews/ghost not found"):
        read(server, ["ghost:x"], users=[1])
    with pytest.raises(InvalidArgument, match="is not a feature reference"):
        read(server, ["spend_7d"], users=[1])
    with pytest.raises(InvalidArgument, match="keyed by INT64; got string values"):
        get_online(server, OnlineQuery(features=["user_stats:spend_7d"], entities={
            "user_id": EntityColumn(string_values=["1"])}))
    with pytest.raises(InvalidArgument, match="needs join key 'user_id'"):
        read(server, ["user_stats:spend_7d"], merchants=["m1"])
    with pytest.raises(InvalidArgument, match="is FLOAT64; got int64_values"):
        server.push(PushRequest(view="merchant_risk", entities={
            "merchant_id": EntityColumn(string_values=["m1"])}, event_timestamps_us=[1],
            features=[FeatureValues(name="chargeback_rate", int64_values=[1])]))
    with pytest.raises(InvalidArgument, match="needs feature 'chargeback_rate'"):
        server.push(PushRequest(view="merchant_risk", entities={
            "merchant_id": EntityColumn(string_values=["m1"])}, event_timestamps_us=[1]))
    with pytest.raises(InvalidArgument, match="1 timestamps for 2 rows"):
        server.push(PushRequest(view="merchant_risk", entities={
            "merchant_id": EntityColumn(string_values=["m1", "m2"])}, event_timestamps_us=[1],
            features=[FeatureValues(name="chargeback_rate", double_values=[1, 2])]))


def test_raw_columns_match_the_typed_ones(server: OnlineFeatures) -> None:
    import numpy as np
    push_users(server, [1, 2], [10.5, 20.0], null_spend=[1])
    features = ["user_stats:spend_7d", "user_stats:orders_7d", "user_stats:active", "user_stats:segment"]
    entities = {"user_id": EntityColumn(int64_values=[2, 1, 5])}
    typed = get_online(server, OnlineQuery(features=features, entities=entities)).features
    raw = get_online(server, OnlineQuery(features=features, entities=entities, raw=True)).features
    assert list(np.frombuffer(raw[0].raw_values, "<f8")) == list(typed[0].double_values)
    assert list(np.frombuffer(raw[1].raw_values, "<i8")) == list(typed[1].int64_values)
    assert list(np.frombuffer(raw[2].raw_values, np.uint8).astype(bool)) == list(typed[2].bool_values)
    assert list(raw[3].string_values) == list(typed[3].string_values)
    for r, t in zip(raw, typed, strict=True):
        assert list(np.frombuffer(r.raw_statuses, np.uint8)) == list(t.statuses)
        assert list(np.frombuffer(r.raw_event_timestamps_us, "<i8")) == list(t.event_timestamps_us)
    assert list(typed[0].statuses) == [NULL, P, MISSING]


def _raw_from_typed(typed: pb.GetOnlineFeaturesResponse, dtypes: dict[str, int]) -> pb.GetOnlineFeaturesResponse:
    """What the raw answer must be, built from the typed one with the generated classes."""
    import numpy as np
    out = pb.GetOnlineFeaturesResponse(view_versions=typed.view_versions)
    for c in typed.features:
        col = out.features.add(name=c.name, string_values=c.string_values, raw_statuses=bytes(c.statuses),
                               raw_event_timestamps_us=np.asarray(c.event_timestamps_us, "<i8").tobytes())
        dtype = dtypes[c.name]
        if dtype == F64:
            col.raw_values = np.asarray(c.double_values, "<f8").tobytes()
        elif dtype == BOOL:
            col.raw_values = np.asarray(c.bool_values, np.uint8).tobytes()
        elif dtype != STR:
            col.raw_values = np.asarray(c.int64_values, "<i8").tobytes()
    return out


def test_raw_answers_are_the_typed_ones_in_raw_form(server: OnlineFeatures) -> None:
    """The raw answer is written as bytes by hand (wire.py): for random reads over
    every feature type -- rows found or not, null, expired, fresh; the all-present fast path and
    the general one; repeated and reordered features; no rows at all -- it parses to exactly the
    typed answer in raw form."""
    import numpy as np
    server.views.definitions.apply_view(FeatureView(name="numeric", entities=["user"], ttl_seconds=3600, features=[
        Feature(name="x", dtype=F64), Feature(name="n", dtype=I64), Feature(name="b", dtype=BOOL)]), "t")
    push_users(server, list(range(1, 21)), [float(i) for i in range(1, 21)], null_spend=[3, 7])
    push_users(server, list(range(21, 31)), [1.0] * 10, ts=NOW - 7200)  # older than user_stats' ttl
    for ids, ts, nulls in ((range(1, 31), NOW - 30, []), (range(31, 36), NOW - 7200, []), (range(36, 41), NOW - 9, [1])):
        ids = list(ids)
        server.push(PushRequest(view="numeric", entities={"user_id": EntityColumn(int64_values=ids)},
                                           event_timestamps_us=[int(ts * US)] * len(ids), features=[
            FeatureValues(name="x", double_values=[i * 0.5 for i in ids],
                             statuses=[NULL if r in nulls else P for r in range(len(ids))]),
            FeatureValues(name="n", int64_values=[-i * 2**40 for i in ids]),
            FeatureValues(name="b", bool_values=[i % 3 == 0 for i in ids])]))
    merchants = [f"m{i}" for i in range(1, 41)]
    server.push(PushRequest(view="merchant_risk", entities={
        "merchant_id": EntityColumn(string_values=merchants[:30])}, event_timestamps_us=[int(NOW * US)] * 30,
        features=[FeatureValues(name="chargeback_rate", double_values=[i / 7 for i in range(30)])]))
    dtypes = {"user_stats:spend_7d": F64, "user_stats:orders_7d": I64, "user_stats:segment": STR,
              "user_stats:active": BOOL, "numeric:x": F64, "numeric:n": I64, "numeric:b": BOOL,
              "merchant_risk:chargeback_rate": F64}
    refs = list(dtypes)
    rng = np.random.default_rng(11)
    cases = [(list(range(1, 31)), ["numeric:x", "numeric:n", "numeric:b", "merchant_risk:chargeback_rate"]),  # all present
             (list(range(1, 21)), refs), ([], refs[:3]), ([45], ["numeric:b", "numeric:b"])]
    for _ in range(30):
        cases.append(([int(i) for i in rng.choice(45, int(rng.integers(1, 12)), replace=False) + 1],
                      [refs[i] for i in rng.choice(len(refs), int(rng.integers(1, 9)))]))
    for ids, features in cases:
        entities = {"user_id": EntityColumn(int64_values=ids),
                    "merchant_id": EntityColumn(string_values=[f"m{i}" for i in ids])}
        typed = get_online(server, OnlineQuery(features=features, entities=entities))
        request = OnlineQuery(features=features, entities=entities, raw=True)
        raw = get_online(server, request)
        assert raw == _raw_from_typed(typed, dtypes), (ids, features)
        assert len(wire.encode_online(server.read(request))) == raw.ByteSize()  # no empty fields written


def test_non_ascii_entity_keys(server: OnlineFeatures) -> None:
    keys = ["plain", "café", "日本-1", "x y\tz"]
    server.push(PushRequest(view="merchant_risk", entities={
        "merchant_id": EntityColumn(string_values=keys)}, event_timestamps_us=[int((NOW - 5) * US)] * 4,
        features=[FeatureValues(name="chargeback_rate", double_values=[0.1, 0.2, 0.3, 0.4])]))
    col = read(server, ["merchant_risk:chargeback_rate"], merchants=["日本-1", "nope", "café", "x y\tz", "plain"])
    assert list(col["merchant_risk:chargeback_rate"].double_values) == [0.3, 0.0, 0.2, 0.4, 0.1]
    assert list(col["merchant_risk:chargeback_rate"].statuses) == [P, MISSING, P, P, P]


def test_mget_frame_is_the_resp_encoding() -> None:
    """The hand-built MGET frame (interleaved per key length) equals the generic RESP encoding,
    for keys of mixed lengths, one key, non-ASCII keys (the fallback), and several views in one
    command (a view without keys adds nothing); no keys at all is no command."""
    from services.features.online import RedisOnlineStore
    from services.features.online.resp import _resp
    store = RedisOnlineStore("redis://127.0.0.1:6379/0", prefix="sf")  # builds frames; connects lazily
    try:
        for keys in (["7", "12", "123", "7", "99999", "1\x1f2"], ["only"], ["café", "a", "日本"]):
            want = _resp(b"MGET", *[f"sf:v:v3:{k}".encode() for k in keys])
            assert store._mget([("v", 3, keys)]) == want, keys
        reads = [("user", 2, ["1", "22"]), ("empty", 1, []), ("merchant", 7, ["m-3", "日"])]
        want = _resp(b"MGET", b"sf:user:v2:1", b"sf:user:v2:22", b"sf:merchant:v7:m-3", "sf:merchant:v7:日".encode())
        assert store._mget(reads) == want
        assert store._mget([("user", 2, ["1"])[:2] + ([],)]) is None
        assert store._spread(reads, ["a", "b", "c", "d"]) == [["a", "b"], [], ["c", "d"]]
    finally:
        store.close()


def test_blocking_reads_reread_a_stale_definition_once(server: OnlineFeatures, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker-thread path (SQLite): while one thread re-reads a stale definition, the others
    answer from the cached one instead of queueing on the definitions database."""
    import threading
    request = OnlineQuery(features=["merchant_risk:chargeback_rate"], entities={
        "merchant_id": EntityColumn(string_values=["m1"])})
    server.read(request)  # cached
    server.views.max_age = 0.0
    definitions = server.views.definitions
    real, reads, entered, release = definitions.get_view, [], threading.Event(), threading.Event()

    def slow(name: str, *args, **kw):  # noqa: ANN002, ANN003, ANN202
        reads.append(name)
        entered.set()
        release.wait(5)
        return real(name, *args, **kw)
    monkeypatch.setattr(definitions, "get_view", slow)
    first = threading.Thread(target=server.read, args=(request,))
    first.start()
    assert entered.wait(5)
    for _ in range(5):  # answered at once from the cache, no second re-read
        assert server.read(request).values().view_versions["merchant_risk"] == 1
    assert reads == ["merchant_risk"]
    release.set()
    first.join(5)
    assert not first.is_alive()


def test_reads_by_feature_set_equal_reads_by_reference(server: OnlineFeatures) -> None:
    ids = [1, 2, 3]
    push_users(server, ids, [1.0, 2.0, 3.0])
    refs = ["user_stats:segment", "user_stats:spend_7d"]
    server.views.definitions.apply_feature_set(FeatureSet(name="model_a", features=refs))
    entities = {"user_id": EntityColumn(int64_values=ids + [99])}
    for raw in (False, True):
        by_set = get_online(server, OnlineQuery(feature_set="model_a", entities=entities, raw=raw))
        by_refs = get_online(server, OnlineQuery(features=refs, entities=entities, raw=raw))
        assert by_set == by_refs and [c.name for c in by_set.features] == refs
    with pytest.raises(InvalidArgument, match="feature_set.*not both"):
        get_online(server, OnlineQuery(feature_set="model_a", features=refs, entities=entities))
    with pytest.raises(NotFound, match="featureSets/nope"):
        get_online(server, OnlineQuery(feature_set="nope", entities=entities))


def _push_at(server: OnlineFeatures, event_us: list[int]) -> PushResult:
    return server.push(PushRequest(
        view="merchant_risk", entities={"merchant_id": EntityColumn(string_values=[f"m{i}" for i in
                                                                                      range(len(event_us))])},
        event_timestamps_us=event_us, features=[FeatureValues(name="chargeback_rate",
                                                                 double_values=[0.5] * len(event_us))]))


def test_event_times_past_the_allowed_skew_are_refused_naming_the_row(server: OnlineFeatures) -> None:
    # The largest timestamp would be served as PRESENT forever (never past its ttl) and, being
    # the newest, would hide every later push for its key.
    assert server.max_future_skew_us == DEFAULT_MAX_FUTURE_SKEW_SECONDS * US
    for far in (2**63 - 1, int(NOW * US) + server.max_future_skew_us + 1):
        with pytest.raises(InvalidArgument) as err:
            _push_at(server, [int(NOW * US), far])
        assert err.value.field == "event_timestamps_us[1]", err.value.field
        assert "row 1" in err.value.message and "STRATA_FEATURES_MAX_FUTURE_SKEW_SECONDS" in err.value.message
        col = read(server, ["merchant_risk:chargeback_rate"], merchants=["m0", "m1"])["merchant_risk:chargeback_rate"]
        assert list(col.statuses) == [MISSING, MISSING]  # nothing of the batch was written
    # A client clock a little ahead is fine.
    assert _push_at(server, [int(NOW * US) + server.max_future_skew_us]).rows_written == 1


def test_the_allowed_skew_is_a_typed_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from services.features.app import FeaturesConfig
    assert FeaturesConfig().max_future_skew_seconds == DEFAULT_MAX_FUTURE_SKEW_SECONDS
    monkeypatch.setenv("STRATA_FEATURES_MAX_FUTURE_SKEW_SECONDS", "30")
    assert FeaturesConfig().max_future_skew_seconds == 30
    for bad in ("-1", "soon"):
        monkeypatch.setenv("STRATA_FEATURES_MAX_FUTURE_SKEW_SECONDS", bad)
        with pytest.raises(ValidationError):
            FeaturesConfig()
