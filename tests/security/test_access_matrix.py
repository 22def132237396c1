"""Authorization, generated from the proto descriptors.

Every RPC of every Strata service (every service of the generated `strata.*` modules, plus the
KServe V2 service whose rules are declared in services/inference/access.py) is called on the
real, running service with auth on, by every kind of caller, with an empty request. What each
caller must get comes from the method's declared `(strata.common.v1.access)` option
(services/common/policy.py `policies_for`), never from a table written here:

- no token, a token signed with another key, an expired token -> UNAUTHENTICATED (unless the
  method is public);
- a valid token with no role, or with a role below the declared min_role -> PERMISSION_DENIED;
- a role at or above min_role -> anything but PERMISSION_DENIED / UNAUTHENTICATED.

A method without a declared role fails `test_every_method_declares_its_access`, read from the
generated modules, the gateway's descriptor set and protos/ itself (compiled here), so a new RPC
without a role fails the suite even before its code is regenerated. Every mutating call
(`mutates: true`) leaves an audit row (principal, method, resource, outcome) in its service's
database, including calls the role check refused.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import uuid
from importlib import resources
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from strata.common.v1 import options_pb2

from services.common.auth import mint_token
from services.common.policy import policies_for
from tests.security.conftest import ROLES, SECRET, Platform
from tests.security.rpc import (
    EXTRA_SERVICES, Rpc, all_rpcs, generated_services, invoke, undeclared)

ROOT = Path(__file__).resolve().parents[2]
RPCS = all_rpcs()
MUTATING = [r for r in RPCS if r.policy.mutates]
DENIED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}


def _role_value(role: str) -> int:
    """A role name's value in the proto's Role enum (the enum is ordered by rank)."""
    return options_pb2.Role.Value(f"ROLE_{role.upper()}")


# -- every method declares its access --------------------------------------------------------

def _services_of(fds: descriptor_pb2.FileDescriptorSet) -> list:
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    out = []
    for f in fds.file:
        out += list(pool.FindFileByName(f.name).services_by_name.values())
    return out


def _compiled_protos(tmp: Path) -> descriptor_pb2.FileDescriptorSet:
    """protos/ as they are now (the source of truth, before any regeneration)."""
    files = sorted(str(p.relative_to(ROOT / "protos")) for r in ("strata", "inference")
                   for p in (ROOT / "protos" / r).rglob("*.proto"))
    out = tmp / "protos.pb"
    well_known = resources.files("grpc_tools") / "_proto"
    done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
                           f"-I{well_known}", "--include_imports", f"--descriptor_set_out={out}", *files],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"protos/ do not compile:\n{done.stderr}")
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@pytest.mark.parametrize("source", ["generated modules", "gateway/strata.pb", "protos/"])
def test_every_method_declares_its_access(source: str, tmp_path: Path) -> None:
    if source == "generated modules":
        services = generated_services()
    elif source == "gateway/strata.pb":
        services = _services_of(descriptor_pb2.FileDescriptorSet.FromString(
            (ROOT / "gateway" / "strata.pb").read_bytes()))
    else:
        services = _services_of(_compiled_protos(tmp_path))
    names = {s.full_name for s in services}
    assert {"strata.registry.v1.RegistryService", "strata.features.v1.FeatureService",
            "strata.inference.v1.InferenceService", *EXTRA_SERVICES} <= names, names
    assert undeclared(services) == [], f"methods without a declared role in {source}"


def test_the_check_catches_a_method_without_a_role() -> None:
    """The checks above (and the server's start-up) really refuse an RPC with no access option."""
    f = descriptor_pb2.FileDescriptorProto(name="security_probe.proto", package="strata.probe.v1",
                                           syntax="proto3")
    f.message_type.add(name="Empty")
    svc = f.service.add(name="ProbeService")
    svc.method.add(name="Undeclared", input_type=".strata.probe.v1.Empty",
                   output_type=".strata.probe.v1.Empty")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    probe = pool.FindServiceByName("strata.probe.v1.ProbeService")
    assert undeclared([probe]) == [
        "/strata.probe.v1.ProbeService/Undeclared (no (strata.common.v1.access) option)"]
    with pytest.raises(ValueError, match="declares no"):
        policies_for([probe])


def test_the_matrix_covers_every_method() -> None:
    """The matrix below is generated from the same descriptors: nothing is left out."""
    served = {f"/{s.full_name}/{m.name}" for s in generated_services() for m in s.methods}
    assert {r.path for r in RPCS} == served


# -- the role matrix -------------------------------------------------------------------------

def _callers(p: Platform) -> list[tuple[str, list[tuple[str, str]], int | None]]:
    """(label, metadata, role value or None for "not authenticated")."""
    bearer = lambda t: [("authorization", f"Bearer {t}")]  # noqa: E731
    out: list[tuple[str, list[tuple[str, str]], int | None]] = [
        ("no token", [], None),
        ("token signed with another key", bearer(mint_token(SECRET[::-1], "sec-forger", ["admin"])), None),
        ("expired admin token",
         bearer(mint_token(SECRET, "sec-expired", ["admin"], ttl_seconds=-3600)), None),
        ("token with no role", bearer(mint_token(SECRET, "sec-norole", [])), options_pb2.ROLE_UNSPECIFIED),
    ]
    out += [(role, p.auth(role), _role_value(role)) for role in ROLES]
    return out


def _expected(rpc: Rpc, rank: int | None) -> grpc.StatusCode | None:
    """The status the caller must get, from the declared policy; None: allowed (anything but
    PERMISSION_DENIED/UNAUTHENTICATED)."""
    if rpc.policy.min_role == options_pb2.ROLE_UNSPECIFIED:
        return None
    if rank is None:
        return grpc.StatusCode.UNAUTHENTICATED
    return None if rank >= rpc.policy.min_role else grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("rpc", RPCS, ids=[r.short for r in RPCS])
def test_role_matrix(platform: Platform, rpc: Rpc) -> None:
    assert rpc.process in platform.addrs, \
        f"{rpc.path}: tests/security/conftest.py starts no {rpc.process} service"
    empty = rpc.request_class()().SerializeToString()
    wrong = []
    for label, md, rank in _callers(platform):
        out = invoke(platform.channel(rpc.process), rpc.method, rpc.path, empty, md, timeout=30)
        want = _expected(rpc, rank)
        ok = out.code not in DENIED if want is None else out.code == want
        if not ok:
            wrong.append(f"{label}: got {out.code.name} ({out.details[:200]!r}), "
                         f"want {'allowed' if want is None else want.name}")
    role = options_pb2.Role.Name(rpc.policy.min_role)
    assert not wrong, f"{rpc.path} (min_role {role}):\n  " + "\n  ".join(wrong)
    assert platform.alive(rpc.process)


# -- the audit log ---------------------------------------------------------------------------

_FIELD = re.compile(r"\{([^}]+)\}")


def _probe_request(rpc: Rpc) -> tuple[object, str]:
    """A request naming a resource in every field the method's resource template uses (the
    template is the method's declared HTTP path, or its code-declared rule), and that resource
    as the template renders it."""
    probe = f"probe-{rpc.method.name.lower()}"[:60]
    req = rpc.request_class()()
    values: dict[str, str] = {}
    template = _template(rpc)
    for path in _FIELD.findall(template):
        msg, desc = req, rpc.method.input_type
        *parents, leaf = path.split(".")
        for name in parents:
            msg, desc = getattr(msg, name), desc.fields_by_name[name].message_type
        fd = desc.fields_by_name[leaf]
        value: object = probe if fd.type == FieldDescriptor.TYPE_STRING else 7
        setattr(msg, leaf, value)
        values[path] = str(value)
    return req, _FIELD.sub(lambda m: values[m.group(1)], template)


def _template(rpc: Rpc) -> str:
    """The method's resource name template (MethodPolicy.resource: from its google.api.http
    path, or declared in code); "" where there is none, and then any non-empty resource will do."""
    return getattr(rpc.policy, "resource", "") or ""


def _audit_rows(p: Platform, service: str, request_id: str) -> list[dict]:
    db = p.database(service)
    assert db.exists(), f"{service} has no database at {db}"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT principal, method, resource, request_id, outcome, message, time "
                            "FROM audit_events WHERE request_id = ?", (request_id,)).fetchall()
    finally:
        conn.close()
    return [dict(r) for r in rows]


def _check_row(p: Platform, rpc: Rpc, role: str, expected_resource: str, md: list[tuple[str, str]],
               refused: bool = False) -> None:
    rid = f"sec-audit-{uuid.uuid4().hex[:16]}"
    req, _ = _probe_request(rpc)
    out = invoke(p.channel(rpc.process), rpc.method, rpc.path, req.SerializeToString(),
                 [*md, ("x-request-id", rid)], timeout=30)
    if refused:
        assert out.code == grpc.StatusCode.PERMISSION_DENIED, \
            f"{rpc.path} by {role}: {out.code.name} {out.details!r}"
    rows = _audit_rows(p, rpc.process, rid)
    assert len(rows) == 1, (f"{rpc.path} by {role} ({out.code.name}: {out.details[:200]!r}) left "
                            f"{len(rows)} audit rows with request id {rid}, want 1")
    row = rows[0]
    problems = []
    if row["principal"] != p.subject(role):
        problems.append(f"principal {row['principal']!r}")
    if row["method"] != rpc.path:
        problems.append(f"method {row['method']!r}")
    if row["outcome"] != out.code.name:
        problems.append(f"outcome {row['outcome']!r} but the caller saw {out.code.name}")
    if not row["resource"]:
        problems.append("no resource")
    elif expected_resource and not row["resource"].startswith(expected_resource):
        problems.append(f"resource {row['resource']!r} does not name the requested {expected_resource!r}")
    if not row["time"]:
        problems.append("no time")
    assert not problems, f"{rpc.path} by {role} ({out.code.name}): audit row {row}: " + "; ".join(problems)


@pytest.mark.parametrize("rpc", MUTATING, ids=[r.short for r in MUTATING])
def test_mutating_call_is_audited(platform: Platform, rpc: Rpc) -> None:
    _, resource = _probe_request(rpc)
    _check_row(platform, rpc, "admin", resource, platform.auth("admin"))


@pytest.mark.parametrize("rpc", MUTATING, ids=[r.short for r in MUTATING])
def test_refused_mutating_call_is_audited(platform: Platform, rpc: Rpc) -> None:
    """A caller below the method's role (viewer; a token with no role where viewer may call it)."""
    assert rpc.policy.min_role != options_pb2.ROLE_UNSPECIFIED, f"{rpc.path} mutates and is public"
    _, resource = _probe_request(rpc)
    if _role_value("viewer") < rpc.policy.min_role:
        role, md = "viewer", platform.auth("viewer")
    else:
        token = mint_token(SECRET, platform.subject("norole"), [])
        role, md = "norole", [("authorization", f"Bearer {token}")]
    _check_row(platform, rpc, role, resource, md, refused=True)
