"""The strata command line: argument handling, the supervisor, and the registry commands
against a real registry process."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from services.cli import build_parser, main, parse_pairs
from services.demo import build_model
from services.dev_credentials import write_tokens
from services.launcher import Child, Supervisor
from services.common.auth import Authenticator
from services.common.settings import CommonSettings
from tests.processes import free_port, start_service, stop_process


def test_parse_pairs_converts_values_and_names_the_bad_item() -> None:
    assert parse_pairs(["auc=0.9", "loss=1"], "--metric", float) == {"auc": 0.9, "loss": 1.0}
    with pytest.raises(SystemExit, match="--tag 'novalue' must be KEY=VALUE"):
        parse_pairs(["novalue"], "--tag")
    with pytest.raises(SystemExit, match="not a number"):
        parse_pairs(["auc=high"], "--metric", float)


def test_download_needs_exactly_one_of_version_and_alias(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="either VERSION or --alias"):
        main(["--addr", "127.0.0.1:1", "download", "m", "1", "--alias", "champion", "-o", "/tmp/x"])


def test_token_command_mints_a_token_the_services_accept(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "cli-test-secret-0123456789abcdef012345"
    assert main(["token", "--secret", secret, "--sub", "ann", "--role", "approver"]) == 0
    token = capsys.readouterr().out.strip()
    principal = Authenticator(CommonSettings(jwt_secret=secret)).authenticate(f"Bearer {token}")
    assert principal.subject == "ann" and principal.roles == {"approver"}


def test_unknown_subcommand_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["frobnicate"])
    assert e.value.code == 2


def _child(tmp_path: Path, code: str, name: str = "c") -> Child:
    return Child(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


def test_supervisor_restarts_a_crashed_child_after_backoff(tmp_path: Path) -> None:
    child = _child(tmp_path, "import sys; sys.exit(3)")
    sup = Supervisor([child], max_restarts=5, window=60)
    sup.start_all()
    child.proc.wait()
    first = child.proc
    assert sup.check_once(now=100.0)  # exit noticed: restart scheduled in 1 s
    assert child.proc is first
    assert sup.check_once(now=100.5) and child.proc is first  # still backing off
    assert sup.check_once(now=101.0) and child.proc is not first  # restarted
    child.proc.wait()
    assert sup.check_once(now=102.0) and child.next_start == 104.0  # backoff doubles: 2 s
    sup.stop_all()


def test_supervisor_gives_up_on_a_child_that_keeps_crashing(tmp_path: Path) -> None:
    child = _child(tmp_path, "import sys; sys.exit(1)")
    sup = Supervisor([child], max_restarts=2, window=60)
    sup.start_all()
    now = 0.0
    results = []
    for _ in range(12):
        child.proc.wait()
        now += 40.0 if not results else 1.0
        results.append(sup.check_once(now=now))
        if not results[-1]:
            break
        now = max(now, child.next_start)
        sup.check_once(now=now)
    assert results[-1] is False
    sup.stop_all()


def test_stop_all_terminates_running_children(tmp_path: Path) -> None:
    children = [_child(tmp_path, "import time; time.sleep(60)", f"c{i}") for i in range(2)]
    sup = Supervisor(children)
    sup.start_all()
    sup.stop_all(timeout=10)
    assert all(c.proc.returncode is not None for c in children)


def test_write_tokens_gives_one_token_per_role(tmp_path: Path) -> None:
    path = write_tokens(tmp_path, "s" * 40)
    text = path.read_text()
    for role in ("VIEWER", "DEVELOPER", "APPROVER", "ADMIN"):
        assert f"export STRATA_{role}_TOKEN=" in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"


@pytest.fixture(scope="module")
def registry_addr(tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    proc = start_service("registry", tmp_path_factory.mktemp("cli-home"), port, {"STRATA_AUTH": "disabled"})
    yield f"127.0.0.1:{port}"
    stop_process(proc)


def test_register_show_alias_download_against_a_registry(registry_addr: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "scorer.onnx"
    build_model(model)
    base = ["--addr", registry_addr]
    assert main([*base, "register", "cli-model", str(model), "--create-model", "--metric", "auc=0.9"]) == 0
    out = capsys.readouterr().out
    assert "cli-model v1" in out and "features" in out and "auc=0.9" in out
    assert main([*base, "alias", "set", "cli-model", "challenger", "1"]) == 0
    assert main([*base, "--json", "versions", "show", "cli-model", "1"]) == 0
    capsys.readouterr()
    dest = tmp_path / "out" / "model.onnx"
    assert main([*base, "download", "cli-model", "--alias", "challenger", "-o", str(dest)]) == 0
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(model.read_bytes()).digest()
    assert main([*base, "card", "cli-model", "1"]) == 0
    assert "# cli-model" in capsys.readouterr().out


def test_errors_print_the_status_and_exit_1(registry_addr: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--addr", registry_addr, "models", "show", "no-such-model"]) == 1
    assert capsys.readouterr().err.strip() == "error: NOT_FOUND: model 'no-such-model' not found"


def _visible_versions(base: list[str], name: str, capsys: pytest.CaptureFixture[str]) -> tuple[list[int], int]:
    """(versions `strata versions list` shows, the model's latest_version) as a user sees them."""
    import json
    capsys.readouterr()
    assert main([*base, "--json", "versions", "list", name]) == 0
    versions = [v["version"] for v in json.loads(capsys.readouterr().out)]
    assert main([*base, "--json", "models", "show", name]) == 0
    return versions, json.loads(capsys.readouterr().out).get("latest_version", 0)


def test_register_with_a_missing_file_creates_nothing(registry_addr: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--addr", registry_addr]
    missing = tmp_path / "nowhere.onnx"
    assert main([*base, "register", "cli-missing", str(missing), "--create-model"]) == 1
    assert "nowhere.onnx" in capsys.readouterr().err
    assert main([*base, "models", "show", "cli-missing"]) == 1  # not even the model
    model = tmp_path / "ok.onnx"
    build_model(model)
    assert main([*base, "register", "cli-missing", str(model), "--create-model"]) == 0
    assert main([*base, "register", "cli-missing", str(missing)]) == 1
    assert _visible_versions(base, "cli-missing", capsys) == ([1], 1)


def test_register_with_a_bad_onnx_file_leaves_no_version_and_latest_unchanged(
        registry_addr: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--addr", registry_addr]
    model, bad = tmp_path / "ok.onnx", tmp_path / "bad.onnx"
    build_model(model)
    bad.write_bytes(b"this is not an ONNX model" * 100)
    assert main([*base, "register", "cli-bad", str(model), "--create-model"]) == 0
    capsys.readouterr()
    assert main([*base, "register", "cli-bad", str(bad)]) == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: artifact:")
    assert _visible_versions(base, "cli-bad", capsys) == ([1], 1)
    assert main([*base, "versions", "show", "cli-bad", "2"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    # The next good registration takes the next number (never reused) and becomes the latest.
    assert main([*base, "register", "cli-bad", str(model)]) == 0
    assert _visible_versions(base, "cli-bad", capsys) == ([3, 1], 3)


def test_register_create_model_with_a_bad_onnx_file_creates_no_model(
        registry_addr: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--addr", registry_addr]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not an ONNX model" * 100)
    assert main([*base, "register", "cli-bad-new", str(bad), "--create-model"]) == 1
    assert "bad.onnx: not a valid ONNX model" in capsys.readouterr().err
    assert main([*base, "models", "show", "cli-bad-new"]) == 1  # no empty model left behind


def test_register_allow_nan_is_recorded_in_the_signature(registry_addr: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import json
    model = tmp_path / "nan.onnx"
    build_model(model)
    base = ["--addr", registry_addr]
    assert main([*base, "register", "cli-nan", str(model), "--create-model"]) == 0
    assert main([*base, "register", "cli-nan", str(model), "--allow-nan"]) == 0
    capsys.readouterr()
    flags = []
    for version in ("1", "2"):
        assert main([*base, "--json", "versions", "show", "cli-nan", version]) == 0
        flags.append(json.loads(capsys.readouterr().out)["signature"].get("allow_nan", False))
    assert flags == [False, True]
