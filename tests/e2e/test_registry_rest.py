"""The registry over REST/JSON through a real Envoy, as a web client or a script would use it."""

from __future__ import annotations

import base64
import hashlib
import uuid

import pytest
import requests

from tests.conftest import make_onnx_model
from tests.e2e.conftest import Platform

pytestmark = pytest.mark.e2e
CHUNK = 4 << 20  # base64 in JSON: 4 MiB of bytes is ~5.6 MB on the wire


def upload(p: Platform, dev: dict, name: str, version: int, data: bytes, sha256: str) -> requests.Response:
    """Begin, append in chunks, commit: returns the commit response."""
    r = requests.post(f"{p.rest}/v1/models/{name}/versions/{version}/artifact:beginUpload", headers=dev,
                      json={"size_bytes": len(data), "sha256": sha256, "filename": "model.onnx"})
    assert r.status_code == 200, r.text
    upload_id = r.json()["upload"]["upload_id"]
    for offset in range(0, len(data), CHUNK):
        chunk = data[offset:offset + CHUNK]
        r = requests.post(f"{p.rest}/v1/uploads/{upload_id}:append", headers=dev,
                          json={"offset": offset, "data": base64.b64encode(chunk).decode()})
        assert r.status_code == 200, r.text
        assert int(r.json()["received_bytes"]) == offset + len(chunk)
    return requests.post(f"{p.rest}/v1/uploads/{upload_id}:commit", headers=dev, json={})


def final_files(p: Platform, name: str) -> list[str]:
    root = p.home / "artifacts" / "models" / name
    return sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()) if root.exists() else []


def staged_files(p: Platform) -> list[str]:
    root = p.home / "artifacts" / ".staging"
    return [str(f) for f in root.rglob("*") if f.is_file()] if root.exists() else []


def test_register_upload_list_alias_download_over_rest(platform: Platform) -> None:
    p, dev = platform, platform.headers("alice", "developer")
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    r = requests.post(f"{p.rest}/v1/models", headers=dev, json={
        "registered_model": {"name": name, "description": "fraud scorer", "tags": {"team": "risk"}},
        "request_id": f"create-{name}"})
    assert r.status_code == 200, r.text
    assert r.json()["registered_model"]["owner"] == "alice"

    r = requests.post(f"{p.rest}/v1/models/{name}/versions", headers=dev,
                      json={"framework": "onnx", "metrics": {"auc": 0.91}, "lineage": {"mlflow_run_id": "run-1"}})
    assert r.status_code == 200, r.text
    version = r.json()["model_version"]["version"]
    assert r.json()["model_version"]["status"] == "MODEL_VERSION_STATUS_PENDING_UPLOAD"

    data = make_onnx_model(n_inputs=1024, pad_bytes=50 << 20)
    assert len(data) >= 50 << 20
    digest = hashlib.sha256(data).hexdigest()
    r = upload(p, dev, name, version, data, digest)
    assert r.status_code == 200, r.text
    mv = r.json()["model_version"]
    assert mv["status"] == "MODEL_VERSION_STATUS_READY"
    assert mv["artifact"]["sha256"] == digest and int(mv["artifact"]["size_bytes"]) == len(data)
    assert mv["signature"]["inputs"][0] == {"name": "x", "dtype": "DATA_TYPE_FLOAT32", "shape": ["-1", "1024"]}

    viewer = p.headers("victor", "viewer")
    r = requests.get(f"{p.rest}/v1/models", headers=viewer, params={"query": name, "tags": "team=risk"})
    assert r.status_code == 200, r.text
    assert [m["name"] for m in r.json()["registered_models"]] == [name]
    r = requests.get(f"{p.rest}/v1/models/{name}/versions", headers=viewer)
    assert [v["version"] for v in r.json()["model_versions"]] == [version]

    r = requests.put(f"{p.rest}/v1/models/{name}/aliases/challenger", headers=dev, json={"version": version})
    assert r.status_code == 200, r.text
    r = requests.get(f"{p.rest}/v1/models/{name}/aliases/challenger", headers=viewer)
    assert r.json()["model_version"]["version"] == version
    assert r.json()["model_version"]["aliases"] == ["challenger"]

    r = requests.get(f"{p.rest}/v1/models/{name}/versions/{version}/artifact", headers=viewer, stream=True)
    assert r.status_code == 200
    assert r.headers["x-strata-sha256"] == digest
    h = hashlib.sha256()
    size = 0
    for chunk in r.iter_content(1 << 20):
        h.update(chunk)
        size += len(chunk)
    assert (size, h.hexdigest()) == (len(data), digest)

    r = requests.get(f"{p.rest}/v1/models/{name}/versions/{version}/card", headers=viewer)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/markdown")
    assert "auc" in r.text and "run-1" in r.text and "challenger" in r.text


def test_missing_token_is_401(platform: Platform) -> None:
    r = requests.get(f"{platform.rest}/v1/models")
    assert r.status_code == 401


def test_viewer_cannot_write_403_and_nothing_is_created(platform: Platform) -> None:
    p = platform
    r = requests.post(f"{p.rest}/v1/models", headers=p.headers("victor", "viewer"),
                      json={"registered_model": {"name": "viewer-made"}})
    assert r.status_code == 403
    r = requests.get(f"{p.rest}/v1/models/viewer-made", headers=p.headers("victor", "viewer"))
    assert r.status_code == 404


def test_malformed_request_is_400_naming_the_field(platform: Platform) -> None:
    p = platform
    r = requests.post(f"{p.rest}/v1/models", headers=p.headers("alice", "developer"),
                      json={"registered_model": {"name": "has spaces!"}})
    assert r.status_code == 400
    assert "registered_model.name" in r.json()["message"]
    r = requests.get(f"{p.rest}/v1/models", headers=p.headers("alice", "viewer"), params={"page_size": -1})
    assert r.status_code == 400 and "page_size" in r.json()["message"]


def test_sha256_mismatch_is_rejected_and_nothing_is_stored(platform: Platform) -> None:
    p, dev = platform, platform.headers("alice", "developer")
    name = f"e2e-bad-{uuid.uuid4().hex[:8]}"
    assert requests.post(f"{p.rest}/v1/models", headers=dev, json={"registered_model": {"name": name}}).ok
    version = requests.post(f"{p.rest}/v1/models/{name}/versions", headers=dev,
                            json={"framework": "onnx"}).json()["model_version"]["version"]
    data = make_onnx_model(pad_bytes=6 << 20)
    r = upload(p, dev, name, version, data, hashlib.sha256(b"something else").hexdigest())
    assert r.status_code == 400
    assert "sha256" in r.json()["message"]
    # A failed registration leaves no visible version and latest_version unchanged.
    r = requests.get(f"{p.rest}/v1/models/{name}/versions/{version}", headers=dev)
    assert r.status_code == 404
    model = requests.get(f"{p.rest}/v1/models/{name}", headers=dev).json()["registered_model"]
    assert model.get("latest_version", 0) == 0
    assert final_files(p, name) == []
    assert staged_files(p) == []
    r = requests.get(f"{p.rest}/v1/models/{name}/versions/{version}/artifact", headers=dev)
    assert r.status_code == 404


def test_self_approval_is_refused_and_another_approver_promotes(platform: Platform) -> None:
    p = platform
    carol = p.headers("carol", "approver")  # approver role, but she is the requester
    name = f"e2e-promo-{uuid.uuid4().hex[:8]}"
    assert requests.post(f"{p.rest}/v1/models", headers=carol, json={"registered_model": {"name": name}}).ok
    version = requests.post(f"{p.rest}/v1/models/{name}/versions", headers=carol,
                            json={"framework": "onnx"}).json()["model_version"]["version"]
    data = make_onnx_model()
    assert upload(p, carol, name, version, data, hashlib.sha256(data).hexdigest()).ok

    r = requests.put(f"{p.rest}/v1/models/{name}/aliases/production", headers=carol, json={"version": version})
    assert r.status_code == 400 and "protected" in r.json()["message"]  # FAILED_PRECONDITION -> 400

    r = requests.post(f"{p.rest}/v1/models/{name}/versions/{version}:requestPromotion", headers=carol,
                      json={"alias": "production", "reason": "beats champion on holdout"})
    assert r.status_code == 200, r.text
    promotion_id = r.json()["promotion"]["promotion_id"]
    r = requests.post(f"{p.rest}/v1/promotions/{promotion_id}:approve", headers=carol, json={})
    assert r.status_code == 403
    assert "self-approval" in r.json()["message"]
    r = requests.post(f"{p.rest}/v1/promotions/{promotion_id}:approve", headers=p.headers("dave", "approver"),
                      json={"comment": "ok"})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"]["stage"] == "STAGE_PRODUCTION"
    assert r.json()["model_version"]["aliases"] == ["production"]

    events = requests.get(f"{p.rest}/v1/auditEvents", headers=p.headers("dave", "approver"),
                          params={"resource_prefix": f"promotions/{promotion_id}"}).json()["audit_events"]
    assert [(e["principal"], e["method"].rsplit("/", 1)[1], e["outcome"]) for e in events] == [
        ("dave", "ApprovePromotion", "OK"), ("carol", "ApprovePromotion", "PERMISSION_DENIED"),
        ("carol", "RequestPromotion", "OK")]
