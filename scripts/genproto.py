"""Regenerate the Python stubs and the gateway descriptor set from protos/.

    python scripts/genproto.py           # write gen/python/ and gateway/strata.pb
    python scripts/genproto.py --check   # exit 1 when the committed output is stale (CI)

Python modules (with mypy-protobuf .pyi stubs) go to gen/python/, an import root of their own
(see pyproject.toml) that holds generated code only, so generated imports such as
`from strata.common.v1 import types_pb2` resolve. Everything generated is under the one
top-level package `strata`: the KServe V2 protocol too (protos/strata/kserve/v2/, imported as
`strata.kserve.v2.grpc_service_pb2`), whose proto package stays `inference` as the protocol
fixes it. googleapis types (google.api, google.rpc) come from the googleapis-common-protos
package at run time and are not generated here.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PY_OUT = ROOT / "gen" / "python"
DESCRIPTOR = ROOT / "gateway" / "strata.pb"
# Top-level proto directories that belong to Strata (generated); the rest is vendored.
OWN_ROOTS = ("strata",)
# Error detail types must be in Envoy's descriptor set, or convert_grpc_status cannot turn a
# status with details (google.rpc.BadRequest) into a JSON body and the REST client gets none.
DESCRIPTOR_EXTRAS = ("google/rpc/status.proto", "google/rpc/error_details.proto")


def own_protos() -> list[str]:
    files = []
    for root in OWN_ROOTS:
        if (PROTOS / root).is_dir():
            files += sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / root).rglob("*.proto"))
    return files


def generate(py_out: Path, descriptor: Path) -> None:
    well_known = resources.files("grpc_tools") / "_proto"
    plugin_dir = Path(sys.executable).parent
    files = own_protos()
    py_out.mkdir(parents=True, exist_ok=True)
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    protoc = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}"]
    subprocess.run([
        *protoc,
        f"--python_out={py_out}", f"--grpc_python_out={py_out}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={py_out}", f"--mypy_grpc_out={py_out}",
        *files,
    ], check=True, cwd=ROOT, capture_output=True)
    subprocess.run([
        *protoc, "--include_imports", "--include_source_info", f"--descriptor_set_out={descriptor}",
        *files, *DESCRIPTOR_EXTRAS,
    ], check=True, cwd=ROOT)
    # Packages need __init__.py so setuptools finds them.
    for d in [p for p in py_out.rglob("*") if p.is_dir() and "__pycache__" not in p.parts]:
        (d / "__init__.py").touch()


def stale(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [f"{a}/{n}" for n in cmp.left_only + cmp.right_only + cmp.diff_files]
    for sub in cmp.common_dirs:
        out += stale(a / sub, b / sub)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if committed output is stale")
    args = ap.parse_args()
    if not args.check:
        shutil.rmtree(PY_OUT, ignore_errors=True)
        generate(PY_OUT, DESCRIPTOR)
        print(f"generated {len(own_protos())} protos -> {PY_OUT.relative_to(ROOT)}, {DESCRIPTOR.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        generate(t / "py", t / "strata.pb")
        diffs = stale(PY_OUT, t / "py") if PY_OUT.is_dir() else [str(PY_OUT)]
        if not filecmp.cmp(DESCRIPTOR, t / "strata.pb", shallow=False) if DESCRIPTOR.exists() else True:
            diffs.append(str(DESCRIPTOR))
    if diffs:
        print("generated code is stale; run: python scripts/genproto.py\n  " + "\n  ".join(diffs))
        return 1
    print("generated code is fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
