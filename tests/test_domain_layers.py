"""The domain of every service knows nothing of protobuf: importing a domain module must not load
any generated module (gen/python's `strata.*` packages), nor its service's transport side. Only the transport side of a service
(its servicers, the converters beside them, the hand-written wire encoder, the CLI and the
process wiring) may. Each module is imported in a fresh interpreter, so one module's imports
cannot hide another's."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# The transport side of each service: what may import generated code. Everything else under the
# service's package is domain. Migrations are scripts run by Alembic, not imported by the service.
TRANSPORT = {
    "services.registry": {"app", "__main__", "server", "card"},
    "services.features": {"app", "__main__", "cli", "servicer", "convert", "wire"},
    "services.training": {"app", "__main__", "cli", "server", "convert", "registry_target", "feature_source"},
    "services.inference": {"app", "__main__", "cli", "server", "v2", "convert", "codec", "batch_servicer", "predlog_format",
                            "registry_source", "feature_client", "monitoring_sink"},
    "services.monitoring": {"app", "__main__", "server", "convert", "wire", "registry_source", "alerts_server",
                            "alerts_convert", "training_trigger"},
}


def _domain_modules(package: str) -> list[str]:
    path = ROOT / package.replace(".", "/")
    out = []
    for info in pkgutil.walk_packages([str(path)], prefix=f"{package}."):
        short = info.name.removeprefix(f"{package}.")
        if short.split(".")[0] in TRANSPORT[package] or short.startswith("migrations"):
            continue
        out.append(info.name)
    return sorted(out)


DOMAIN = [m for package in TRANSPORT for m in _domain_modules(package)]


def test_every_service_has_domain_modules() -> None:
    for package in TRANSPORT:
        assert [m for m in DOMAIN if m.startswith(f"{package}.")], package
    registry = {m.rsplit(".", 1)[1] for m in DOMAIN if m.startswith("services.registry.domain.")}
    assert {"entities", "models", "versions", "uploads", "promotions"} <= registry


@pytest.mark.parametrize("module", DOMAIN)
def test_domain_module_loads_no_generated_code(module: str) -> None:
    package = next(p for p in TRANSPORT if module.startswith(f"{p}."))
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout)
    assert [n for n in loaded if n == "strata" or n.startswith("strata.")] == [], f"{module} loads generated code"
    # Nor its service's transport side (the servicer, the converters, the wiring).
    transport = [n for n in loaded if n.startswith(f"{package}.")
                 and n.removeprefix(f"{package}.").split(".")[0] in TRANSPORT[package]]
    assert transport == [], f"{module} loads {transport}"
