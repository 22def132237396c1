"""The gateway depends on the services' shared runtime only: importing the gateway loads
services/common and no service's package (registry, features, inference, the CLI or launcher)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_gateway_imports_no_service_package() -> None:
    code = (
        "import json, sys\n"
        "import gateway.__main__, gateway.config, gateway.envoy\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.startswith('services.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    loaded = json.loads(out.stdout)
    assert "services.common.policy" in loaded
    assert [n for n in loaded if not n.startswith("services.common")] == []
