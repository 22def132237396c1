"""`strata monitor ...` against the running monitoring service (a registry and the monitoring
service as processes): tables by default, the RPC's JSON with --json, the HTML report written to a
file, --since as the window's start, and errors as `error: CODE: message` with exit status 1."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.protobuf import json_format
from strata.monitoring.v1 import monitoring_pb2 as pb

from services.cli import main, parse_duration
from tests.monitoring.conftest import FEATURES, Platform, classifier_onnx, records
from tests.monitoring.test_monitoring_grpc import classified, features, ingest, register


def strata(platform: Platform, *argv: str) -> int:
    return main(["--monitoring-addr", platform.monitoring_addr, *argv])


@pytest.fixture(scope="module")
def served(platform: Platform) -> int:
    """cli-model: a reference, 500 predictions an hour old on endpoint cli-ep with FEATURES[2]
    shifted, labels for 400 of them."""
    stub, rng = platform.monitoring(), np.random.default_rng(21)
    version = register(platform, "cli-model", classifier_onnx())
    ref = features(rng, 1500)
    (platform.store / "refs").mkdir(exist_ok=True)
    pq.write_table(pa.table({**ref, "label": (ref[FEATURES[0]] > 0).astype(np.int64)}),
                   platform.store / "refs" / "cli.parquet")
    stub.SetReference(pb.SetReferenceRequest(model="cli-model", version=version, table_uri="refs/cli.parquet"))
    n = 500
    ingest(stub, pb.IngestPredictionsRequest(records=records(
        [f"cli-{i}" for i in range(n)], features(rng, n, shift={2: (3.0, 1.0)}), classified(rng, n),
        endpoint="cli-ep", model="cli-model", version=version,
        times=[(datetime.now(UTC) - timedelta(hours=1)).timestamp()] * n)))
    stub.ReportGroundTruth(pb.ReportGroundTruthRequest(labels=[
        pb.GroundTruth(prediction_id=f"cli-{i}:0", number=float(i % 2)) for i in range(400)]))
    return version


def test_drift_prints_a_table_and_the_rpcs_json(platform: Platform, served: int,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    want = platform.monitoring().GetDriftReport(pb.GetDriftReportRequest(endpoint="cli-ep"))
    (v,) = want.versions
    assert FEATURES[2] in {f.column for f in v.features if f.drifted}
    assert strata(platform, "monitor", "drift", "cli-ep") == 0
    out = capsys.readouterr().out
    assert (f"models/cli-model/versions/{served}  rows 500  drifted {v.drifted_features} of 4 features "
            f"({v.share_drifted:.0%})  dataset drift: {'yes' if v.dataset_drifted else 'no'}") in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.startswith("  ")}
    assert {c: lines[c][6] for c in FEATURES} == {f.column: "DRIFT" if f.drifted else "no" for f in v.features}
    assert lines["label"][1] == "output"
    # --json after the subcommand or before it: the RPC's response as JSON.
    for argv in (("monitor", "drift", "--model", "cli-model", "--version", str(served), "--json"),
                 ("--json", "monitor", "drift", "cli-ep")):
        assert strata(platform, *argv) == 0
        got = json_format.ParseDict(json.loads(capsys.readouterr().out), pb.GetDriftReportResponse())
        assert [(f.column, f.score, f.drifted) for f in got.versions[0].features] == \
            [(f.column, f.score, f.drifted) for f in want.versions[0].features]


def test_quality_and_performance(platform: Platform, served: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert strata(platform, "monitor", "quality", "cli-ep", "--since", "2h") == 0
    out = capsys.readouterr().out
    assert "NULLS (REFERENCE)" in out and "not in the reference: probabilities[0], probabilities[1]" in out
    assert strata(platform, "monitor", "quality", "cli-ep", "--json") == 0
    got = json.loads(capsys.readouterr().out)
    (v,) = got["versions"]
    assert [c["column"] for c in v["features"]] == FEATURES and v["rows"] == "500"
    assert strata(platform, "monitor", "performance", "cli-ep") == 0
    out = capsys.readouterr().out
    assert "labelled 400 (80%)  classification" in out and "accuracy" in out and "roc_auc" in out
    assert strata(platform, "--json", "monitor", "performance", "cli-ep") == 0
    (p,) = json.loads(capsys.readouterr().out)["versions"]
    assert (p["labeled_rows"], p["label_coverage"]) == ("400", 0.8)


def test_report_writes_the_html_page(platform: Platform, served: int, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "drift.html"
    assert strata(platform, "monitor", "report", "cli-ep", "--html", str(out)) == 0
    assert f"{out}: " in capsys.readouterr().out
    columns: list[str] = []

    class Rows(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "tr" and dict(attrs).get("data-column"):
                columns.append(dict(attrs)["data-column"] or "")

    Rows().feed(out.read_text(encoding="utf-8"))
    assert columns == [*FEATURES, "label"]


def test_errors_and_windows(platform: Platform, served: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert strata(platform, "monitor", "drift", "no-such-endpoint") == 1
    assert "error: NOT_FOUND:" in capsys.readouterr().err
    # --since 30m: a window that starts after every row's time.
    assert strata(platform, "monitor", "quality", "cli-ep", "--since", "30m") == 1
    assert "error: FAILED_PRECONDITION: window" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        strata(platform, "monitor", "drift", "cli-ep", "--since", "yesterday")
    with pytest.raises(SystemExit, match="--model and --version"):
        strata(platform, "monitor", "drift", "--model", "cli-model")
    assert parse_duration("1h30m") == timedelta(hours=1, minutes=30)
    assert parse_duration("7d") == timedelta(days=7) and parse_duration("0.5h") == timedelta(minutes=30)
