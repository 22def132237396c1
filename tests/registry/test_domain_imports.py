"""The registry's domain knows nothing of protobuf: importing every module of
services/registry/domain loads no generated stub (gen/python) and not the servicer."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import services.registry.domain as domain

ROOT = Path(__file__).parents[2]


def test_domain_modules_import_no_generated_code() -> None:
    modules = [f"{domain.__name__}.{m.name}" for m in pkgutil.iter_modules(domain.__path__)]
    assert {"entities", "models", "versions", "uploads", "promotions"} <= {m.rsplit(".", 1)[1] for m in modules}
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps({n: getattr(m, '__file__', None) or '' for n, m in sys.modules.items()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    loaded = json.loads(out.stdout)
    gen = str(ROOT / "gen" / "python")
    generated = sorted(n for n, f in loaded.items() if f.startswith(gen))
    assert generated == []
    assert "services.registry.server" not in loaded
