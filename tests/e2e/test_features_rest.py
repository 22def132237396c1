"""The feature service through the gateway: definitions, push and online reads as REST/JSON
through a real Envoy with JWT auth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gateway.config import render_envoy_config
from gateway.envoy import start_envoy, wait_ready, write_config
from services.common.auth import mint_token
from tests.processes import free_port, start_service, stop_process

ROOT = Path(__file__).resolve().parents[2]
SECRET = "e2e-features-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def rest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("e2e-features")
    port, gw_port, admin_port = free_port(), free_port(), free_port()
    procs = [start_service("features", home, port, {"STRATA_JWT_SECRET": SECRET})]
    try:
        config = render_envoy_config(upstreams={"features": f"127.0.0.1:{port}"},
                                     descriptor_path=ROOT / "gateway" / "strata.pb", jwt_secret=SECRET,
                                     listen_host="127.0.0.1", listen_port=gw_port, admin_port=admin_port)
        procs.append(start_envoy(write_config(config, home / "gateway"), home / "envoy.log"))
        wait_ready(admin_port, 20, process=procs[-1])
        yield f"http://127.0.0.1:{gw_port}"
    finally:
        for p in reversed(procs):
            stop_process(p)


def _h(*roles: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, 'e2e', list(roles))}"}


def test_define_push_and_read_over_rest(rest: str) -> None:
    dev, viewer = _h("developer"), _h("viewer")
    r = requests.post(f"{rest}/v1/entities", headers=dev, json={"entity": {
        "name": "driver", "join_key": "driver_id", "value_type": "VALUE_TYPE_INT64"}})
    assert r.status_code == 200, r.text
    r = requests.post(f"{rest}/v1/featureViews", headers=dev, json={"feature_view": {
        "name": "driver_hourly", "entities": ["driver"], "ttl_seconds": 86400, "features": [
            {"name": "trips", "dtype": "DATA_TYPE_INT64"},
            {"name": "rating", "dtype": "DATA_TYPE_FLOAT64",
             "validation": {"min": 1, "has_min": True, "max": 5, "has_max": True}}]}})
    assert r.status_code == 200 and r.json()["outcome"] == "CREATED", r.text
    import time
    now_us = int(time.time() * 1e6)
    r = requests.post(f"{rest}/v1/featureViews/driver_hourly:push", headers=dev, json={
        "entities": {"driver_id": {"int64_values": [1001, 1002]}}, "event_timestamps_us": [now_us, now_us],
        "features": [{"name": "trips", "int64_values": [12, 30]}, {"name": "rating", "double_values": [4.8, 4.1]}]})
    assert r.status_code == 200 and r.json()["rows_written"] == "2", r.text
    r = requests.post(f"{rest}/v1/features:getOnline", headers=viewer, json={
        "features": ["driver_hourly:rating", "driver_hourly:trips"],
        "entities": {"driver_id": {"int64_values": [1002, 1003]}}})
    assert r.status_code == 200, r.text
    rating, trips = r.json()["features"]
    assert rating["double_values"][0] == 4.1 and rating["statuses"] == ["FEATURE_STATUS_PRESENT",
                                                                          "FEATURE_STATUS_NOT_FOUND"]
    assert trips["int64_values"][0] == "30"
    # A bad batch: 400 naming the row and feature, nothing written.
    r = requests.post(f"{rest}/v1/featureViews/driver_hourly:push", headers=dev, json={
        "entities": {"driver_id": {"int64_values": [1003, 1004]}}, "event_timestamps_us": [now_us, now_us],
        "features": [{"name": "trips", "int64_values": [1, 2]}, {"name": "rating", "double_values": [4.0, 9.0]}]})
    assert r.status_code == 400 and "rows[1].rating: 9.0 is above the maximum 5" in r.json()["message"], r.text
    r = requests.post(f"{rest}/v1/features:getOnline", headers=viewer, json={
        "features": ["driver_hourly:trips"], "entities": {"driver_id": {"int64_values": [1003]}}})
    assert r.json()["features"][0]["statuses"] == ["FEATURE_STATUS_NOT_FOUND"]
    assert requests.post(f"{rest}/v1/features:getOnline", json={}).status_code == 401
    r = requests.post(f"{rest}/v1/entities", headers=viewer, json={"entity": {"name": "x", "value_type": 1}})
    assert r.status_code == 403
    # A feature set: applied by a developer, read by name (viewers may not apply one).
    r = requests.post(f"{rest}/v1/featureSets", headers=dev, json={"feature_set": {
        "name": "eta_model", "features": ["driver_hourly:trips", "driver_hourly:rating"]}})
    assert r.status_code == 200 and r.json()["outcome"] == "CREATED", r.text
    assert requests.get(f"{rest}/v1/featureSets/eta_model", headers=viewer).json()["feature_set"]["features"] == [
        "driver_hourly:trips", "driver_hourly:rating"]
    r = requests.post(f"{rest}/v1/features:getOnline", headers=viewer, json={
        "feature_set": "eta_model", "entities": {"driver_id": {"int64_values": [1001]}}})
    assert [(c["name"], c["statuses"]) for c in r.json()["features"]] == [
        ("driver_hourly:trips", ["FEATURE_STATUS_PRESENT"]), ("driver_hourly:rating", ["FEATURE_STATUS_PRESENT"])]
    assert requests.get(f"{rest}/v1/featureSets/nope", headers=viewer).status_code == 404
    r = requests.post(f"{rest}/v1/featureSets", headers=viewer, json={"feature_set": {
        "name": "x", "features": ["driver_hourly:trips"]}})
    assert r.status_code == 403
