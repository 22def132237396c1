"""The command line follows the same settings as `strata up`: ports (STRATA_<NAME>_PORT, the
gateway's), addresses (STRATA_<NAME>_ADDR), and `make up` passes extra arguments on."""

from __future__ import annotations

import subprocess

import pytest

from services.cli import build_parser
from tests.processes import ROOT


def test_cli_addresses_follow_the_port_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REGISTRY", "FEATURES", "INFERENCE"):
        monkeypatch.delenv(f"STRATA_{name}_ADDR", raising=False)
    monkeypatch.setenv("STRATA_REGISTRY_PORT", "6101")
    monkeypatch.setenv("STRATA_FEATURES_PORT", "6102")
    monkeypatch.setenv("STRATA_INFERENCE_PORT", "6104")
    args = build_parser().parse_args(["models", "list"])
    assert (args.addr, args.features_addr, args.inference_addr) == \
        ("127.0.0.1:6101", "127.0.0.1:6102", "127.0.0.1:6104")
    monkeypatch.setenv("STRATA_REGISTRY_ADDR", "registry.internal:7000")
    assert build_parser().parse_args(["models", "list"]).addr == "registry.internal:7000"


def test_up_gateway_ports_follow_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_GATEWAY_PORT", "6180")
    monkeypatch.setenv("STRATA_GATEWAY_ADMIN_PORT", "6190")
    args = build_parser().parse_args(["up"])
    assert (args.gateway_port, args.admin_port) == (6180, 6190)


def test_make_up_passes_extra_arguments() -> None:
    out = subprocess.run(["make", "-n", "up", "ARGS=--no-auth --gateway-port 18080"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "strata up --demo --no-auth --gateway-port 18080" in out, out
