"""Predict by entity key with real processes: a registry holding models whose lineage names their
features, a feature service (online store on the real Redis, or SQLite where Redis is not
running) and an inference service reading it. The features read are the lineage's, in the
model's input order; a missing, expired or null feature takes the feature set's declared default
or refuses the request; bad keys and models not trained from the feature store are refused with
the right status; a view whose schema changed after training is refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from strata.common.v1 import types_pb2
from strata.features.v1 import features_pb2 as fpb
from strata.features.v1 import features_pb2_grpc
from strata.inference.v1 import inference_pb2 as pb
from strata.registry.v1 import registry_pb2 as rpb

from services.clients.registry import RegistryClient
from services.inference import feature_client
from tests.features.conftest import service_online_store
from tests.inference import models
from tests.inference.conftest import Inference, Registry, policy, start_inference
from tests.processes import free_port, start_service, stop_process

FEATURES = ["txn:amount", "txn:count", "txn:vip"]
COLUMNS = ["txn__amount", "txn__count", "txn__vip"]
WEIGHTS, BIAS = [1.0, 10.0, 100.0], 0.5
# customer -> (amount, count, vip); 4 is pushed too long ago (expired), 5 never, 6 with a null amount.
ROWS = {1: (12.5, 3, True), 2: (-4.0, 0, False), 3: (1000.25, 41, True), 4: (1.0, 1, False), 6: (0.0, 2, True)}


@dataclass
class Features:
    addr: str
    stub: features_pb2_grpc.FeatureServiceStub


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Features]:
    home = tmp_path_factory.mktemp("features")
    port = free_port()
    with service_online_store(home, db=11) as online:
        proc = start_service("features", home, port, {"STRATA_AUTH": "disabled",
                                                      "STRATA_FEATURES_ONLINE_STORE": online})
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = features_pb2_grpc.FeatureServiceStub(ch)
                _define_and_push(stub)
                yield Features(f"127.0.0.1:{port}", stub)
        finally:
            stop_process(proc)


def _view(extra: tuple[str, ...] = ()) -> fpb.FeatureView:
    dtypes = {"amount": types_pb2.DATA_TYPE_FLOAT64, "count": types_pb2.DATA_TYPE_INT64,
              "vip": types_pb2.DATA_TYPE_BOOL, **{e: types_pb2.DATA_TYPE_FLOAT64 for e in extra}}
    return fpb.FeatureView(name="txn", entities=["customer"], ttl_seconds=3600,
                           features=[fpb.Feature(name=n, dtype=d) for n, d in dtypes.items()])


def _define_and_push(stub: features_pb2_grpc.FeatureServiceStub) -> None:
    stub.ApplyEntity(fpb.ApplyEntityRequest(entity=fpb.Entity(name="customer", join_key="customer_id",
                                                               value_type=fpb.VALUE_TYPE_INT64)))
    stub.ApplyFeatureView(fpb.ApplyFeatureViewRequest(feature_view=_view()))
    stub.ApplyFeatureSet(fpb.ApplyFeatureSetRequest(feature_set=fpb.FeatureSet(
        name="scoring", features=FEATURES, defaults={"txn:count": 7})))
    now = int(time.time() * 1e6)
    ids = list(ROWS)
    stub.PushFeatures(fpb.PushFeaturesRequest(
        view="txn", entities={"customer_id": fpb.EntityColumn(int64_values=ids)},
        features=[fpb.FeatureValues(name="amount", double_values=[ROWS[i][0] for i in ids],
                                    statuses=[fpb.FEATURE_STATUS_NULL_VALUE if i == 6 else fpb.FEATURE_STATUS_PRESENT
                                              for i in ids]),
                  fpb.FeatureValues(name="count", int64_values=[ROWS[i][1] for i in ids]),
                  fpb.FeatureValues(name="vip", bool_values=[ROWS[i][2] for i in ids])],
        event_timestamps_us=[now - 7200 * 10**6 if i == 4 else now for i in ids]))


@pytest.fixture(scope="module")
def server(registry: Registry, features: Features, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inference]:
    home = tmp_path_factory.mktemp("entity-inference")
    blob = models.columns_linear(COLUMNS, WEIGHTS, BIAS)
    path = Path(home) / "m.onnx"
    path.write_bytes(blob)
    with RegistryClient(registry.addr) as client:
        client.register_onnx("txn_score", path, create_model=True, lineage=rpb.Lineage(
            features=FEATURES, feature_views=["txn:1"], feature_set="scoring", training_job_id="job-1"))
        client.register_onnx("txn_plain", path, create_model=True)
    srv = start_inference(registry, home, STRATA_FEATURES_ADDR=features.addr)
    stub = srv.stub()
    for name, model in (("txn", "txn_score"), ("plain", "txn_plain")):
        stub.CreateEndpoint(pb.CreateEndpointRequest(endpoint=pb.Endpoint(name=name, policy=policy((model, 1, 1)))))
    try:
        yield srv
    finally:
        stop_process(srv.proc)


def _entities(*ids: object, key: str = "customer_id") -> list[struct_pb2.Struct]:
    out = []
    for i in ids:
        s = struct_pb2.Struct()
        s.update({key: i})
        out.append(s)
    return out


def _predict(srv: Inference, *ids: object, endpoint: str = "txn") -> list[float]:
    resp = srv.stub().Predict(pb.PredictRequest(endpoint=endpoint, entities=_entities(*ids)))
    assert resp.model == ("txn_score" if endpoint == "txn" else "txn_plain")
    return [r.fields["score"].list_value.values[0].number_value for r in resp.rows]


def _expected(amount: float, count: float, vip: float) -> float:
    return float(np.float32(BIAS) + np.float32(amount) * np.float32(WEIGHTS[0])
                 + np.float32(count) * np.float32(WEIGHTS[1]) + np.float32(vip) * np.float32(WEIGHTS[2]))


def _code(srv: Inference, request: pb.PredictRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        srv.stub().Predict(request)
    return e.value.code(), e.value.details()


def test_entity_keys_read_the_lineage_features_in_input_order(server: Inference) -> None:
    got = _predict(server, 3, 1, 2, 1)
    want = [_expected(*ROWS[i]) for i in (3, 1, 2, 1)]
    assert got == pytest.approx(want, rel=1e-6)
    # The same as sending the feature values as rows: serving by key reads what the columns hold.
    rows = []
    for i in (3, 1, 2, 1):
        s = struct_pb2.Struct()
        s.update(dict(zip(COLUMNS, map(float, ROWS[i]), strict=True)))
        rows.append(s)
    by_rows = server.stub().Predict(pb.PredictRequest(endpoint="txn", rows=rows))
    assert [r.fields["score"].list_value.values[0].number_value for r in by_rows.rows] == got


def test_missing_expired_and_null_features_refuse_without_a_default(server: Inference) -> None:
    for ids, row, why in (((1, 5), 1, "has no online row"), ((4,), 0, "is expired"), ((2, 3, 6), 2, "is null")):
        code, details = _code(server, pb.PredictRequest(endpoint="txn", entities=_entities(*ids)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert f"entities[{row}] (customer_id={ids[row]})" in details and "'txn:amount'" in details, details
        assert why in details and "declares no default" in details, details


def test_declared_defaults_fill_what_is_missing(server: Inference, features: Features) -> None:
    features.stub.ApplyFeatureSet(fpb.ApplyFeatureSetRequest(feature_set=fpb.FeatureSet(
        name="scoring", features=FEATURES, defaults={"txn:amount": -1.5, "txn:count": 7, "txn:vip": 0})))
    time.sleep(feature_client.DEFAULTS_MAX_AGE + 0.2)  # the serving process re-reads the set's defaults
    got = _predict(server, 5, 1, 4, 6)
    # 5: nothing online; 4: expired (its stale values are not used); 6: only the amount is null.
    want = [_expected(-1.5, 7, 0), _expected(*ROWS[1]), _expected(-1.5, 7, 0), _expected(-1.5, 2, 1)]
    assert got == pytest.approx(want, rel=1e-6)


def test_bad_keys_are_invalid_arguments_naming_the_field(server: Inference) -> None:
    cases = [
        (pb.PredictRequest(endpoint="txn", entities=_entities("abc")), "entities[customer_id]"),
        (pb.PredictRequest(endpoint="txn", entities=_entities(1.5)), "entities[0].customer_id"),
        (pb.PredictRequest(endpoint="txn", entities=_entities(1, key="user_id")), "entities[customer_id]"),
        (pb.PredictRequest(endpoint="txn", entities=_entities(1) + _entities(2, key="user_id")), "entities[1]"),
        (pb.PredictRequest(endpoint="txn", entities=_entities(1), rows=[struct_pb2.Struct()]), "entities"),
    ]
    for request, field in cases:
        code, details = _code(server, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
    assert _predict(server, 1) == pytest.approx([_expected(*ROWS[1])], rel=1e-6)  # still serving


def test_a_model_not_trained_from_the_feature_store_is_refused(server: Inference) -> None:
    code, details = _code(server, pb.PredictRequest(endpoint="plain", entities=_entities(1)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not trained from the feature store" in details


def test_a_view_changed_since_training_is_refused(server: Inference, features: Features) -> None:
    """Last in the module: the view gets a new schema (version 2) the model was not trained on."""
    out = features.stub.ApplyFeatureView(fpb.ApplyFeatureViewRequest(feature_view=_view(extra=("refunds",))))
    assert out.feature_view.version == 2
    deadline = time.monotonic() + 10
    while True:  # the feature service's view cache is re-read within a second or so
        try:
            _predict(server, 1)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
            assert "trained on view 'txn' version 1" in e.details() and "version 2" in e.details(), e.details()
            return
        assert time.monotonic() < deadline, "the new view version was never seen"
        time.sleep(0.2)
