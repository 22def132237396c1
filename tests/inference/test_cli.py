"""The `strata` inference subcommands against the running service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from services.cli import main
from tests.inference.conftest import Inference, Registry


def _strata(inference: Inference, registry: Registry, *argv: str) -> int:
    return main(["--addr", registry.addr, "--inference-addr", inference.addr, *argv])


def test_deploy_traffic_rollback_predict(inference: Inference, registry: Registry, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _strata(inference, registry, "deploy", "cli-ep", "mlp", "--version", "1") == 0
    assert "cli-ep" in capsys.readouterr().out
    x = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"input": r.tolist()} for r in x]))
    assert _strata(inference, registry, "--json", "predict", "cli-ep", "--file", str(rows)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "1"
    want = ort.InferenceSession(registry.artifacts[("mlp", 1)]).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.array([r["output"] for r in out["rows"]], np.float32), want, rtol=1e-5, atol=1e-5)

    csv = tmp_path / "rows.csv"
    csv.write_text(",".join(f"f{i}" for i in range(32)) + "\n" + "\n".join(",".join(map(str, r)) for r in x) + "\n")
    assert _strata(inference, registry, "--json", "predict", "cli-ep", "--file", str(csv), "--input", "input") == 0
    got = np.array([r["output"] for r in json.loads(capsys.readouterr().out)["rows"]], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    assert _strata(inference, registry, "traffic", "set", "cli-ep", "mlp:1=90", "mlp:2=10", "--shadow", "mlp:3") == 0
    assert "mlp:v1=90, mlp:v2=10  shadow mlp:v3" in capsys.readouterr().out
    assert _strata(inference, registry, "rollback", "cli-ep") == 0
    assert _strata(inference, registry, "endpoints", "revisions", "cli-ep") == 0
    out = capsys.readouterr().out
    assert "rev 3" in out and "rollback" in out


def test_cli_errors_name_the_problem(inference: Inference, registry: Registry,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert _strata(inference, registry, "deploy", "cli-bad", "no-such-model", "--version", "1") == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="MODEL:VERSION=WEIGHT"):
        _strata(inference, registry, "traffic", "set", "cli-ep", "mlp=3")


def test_deploy_production_serves_only_approved_versions(inference: Inference, registry: Registry,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--production marks the endpoint; mlp v1 went through no promotion, so it is refused."""
    assert _strata(inference, registry, "deploy", "cli-prod", "mlp", "--version", "1", "--production") == 1
    err = capsys.readouterr().err
    assert "FAILED_PRECONDITION" in err and "models/mlp/versions/1" in err
