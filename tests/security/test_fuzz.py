"""Fuzzing every method of each service over its real, running process (auth on, admin token).

Per method: Hypothesis draws requests from strategies built from the request's message
descriptor (tests/security/strategies.py), raw random bytes and truncated encodings; a fixed
list of hand-made malformed encodings (invalid UTF-8 in each string field, out-of-range varints,
corrupt lengths, a recursion bomb) is sent too, and a boundary sweep: a request naming the seeded
objects with one number at a time at each edge its type holds (-1, 0, 2^31-1, 2^31, 2^63-1, NaN,
infinities, unknown enum numbers). Some string draws name objects seeded first (a
registered model with an ONNX version, an endpoint serving it, an entity and a feature view with
rows), so the deeper code paths see hostile values as well.

Every answer must be a status the service chose: never INTERNAL or UNKNOWN (an unhandled
exception, an undecodable request turned into "Unexpected <class DecodeError>"), never a hang
(DEADLINE_EXCEEDED), never an error message that echoes a huge input (longer than
MAX_DETAILS, or so long that the client refuses it as RESOURCE_EXHAUSTED). The process must
still run after every call, and gRPC health must answer SERVING after each method. Failures are
collected (with the input, the status and the server log's traceback) and reported together at
the end of the service's test; the inputs are also written under the sandbox's fuzz-failures/
for replaying. Then no file may have been written outside the services' homes.

Reproducible: Hypothesis runs derandomized with no example database; STRATA_FUZZ_EXAMPLES (default
80) sets the number of drawn examples per method; STRATA_FUZZ_VERBOSE=1 (with -s) prints the
statuses each method answered.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import make_onnx_model
from tests.processes import ROOT
from tests.security.conftest import SANDBOX_DEPTH, SERVICES, Platform
from tests.security.rpc import Outcome, Rpc, all_rpcs, invoke
from tests.security.strategies import (
    CANARY, Builder, base_message, boundary_cases, default_pool, describe, malformed)

EXAMPLES = int(os.environ.get("STRATA_FUZZ_EXAMPLES", "80"))
CALL_TIMEOUT = 20.0
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
#: An error message quotes what it must, shortened: a longer one means unbounded input was
#: echoed (over 8 KiB of metadata a default client refuses the answer; over 16 KiB, any).
MAX_DETAILS = 4096

MODEL, ENDPOINT, ENTITY, JOIN_KEY, VIEW = "secmodel", "sec-endpoint", "secuser", "secuser_id", "secview"
SEEDED_NAMES = [MODEL, ENDPOINT, ENTITY, JOIN_KEY, VIEW, f"{VIEW}:spend", f"{VIEW}:segment", "spend",
                "segment", "event_timestamp", "training-sets/fuzz.parquet", "input", "x", "y", "champion",
                "production", "latest", "1", "FLOAT32", "FP32"]


@dataclass
class Seeded:
    model_version: int  # of MODEL, served by ENDPOINT
    blobs: list[bytes]  # valid bytes values: an Arrow IPC entity table of ENTITY's key

    def hints(self, service: str) -> dict[str, list[object]]:
        """What the seeded objects are called, by the field names that name them (names only:
        numbers such as versions stay hostile, next to a name that exists). `name` is first what
        the service itself keeps under that name."""
        first = {"registry": MODEL, "features": VIEW, "inference": ENDPOINT, "training": MODEL,
                 "monitoring": MODEL}[service]
        return {"model": [MODEL], "model_name": [MODEL], "endpoint": [ENDPOINT], "view": [VIEW],
                "name": [first, *(n for n in (MODEL, ENDPOINT, VIEW, ENTITY) if n != first)],
                "model_version": [str(self.model_version)], "features": [f"{VIEW}:spend", f"{VIEW}:segment"],
                "entities": [JOIN_KEY, ENTITY], "join_key": [JOIN_KEY], "entity_arrow": self.blobs,
                "timestamp_column": ["event_timestamp"], "output_uri": ["training-sets/fuzz.parquet"]}


def _entity_table() -> bytes:
    import pyarrow as pa

    table = pa.table({JOIN_KEY: pa.array([1, 2, 3], pa.int64()),
                      "event_timestamp": pa.array([1_700_000_100_000_000] * 3, pa.timestamp("us", tz="UTC"))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def seeded(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """Real objects for the fuzz to reach: a model version with an ONNX artifact, an endpoint
    serving it (loaded), an entity and a feature view with rows pushed."""
    from strata.features.v1 import features_pb2 as fpb
    from strata.features.v1 import features_pb2_grpc
    from strata.common.v1 import types_pb2
    from strata.inference.v1 import inference_pb2 as ipb
    from strata.inference.v1 import inference_pb2_grpc

    from services.clients.registry import RegistryClient

    path = tmp_path_factory.mktemp("onnx") / f"{MODEL}.onnx"
    path.write_bytes(make_onnx_model(4, 2))
    with RegistryClient(platform.addrs["registry"], platform.token("admin")) as client:
        mv = client.register_onnx(MODEL, path, create_model=True)
    md = platform.auth("admin")
    inf = inference_pb2_grpc.InferenceServiceStub(platform.channel("inference"))
    policy = ipb.TrafficPolicy(targets=[ipb.Target(model=MODEL, version=mv.version, weight=100)])
    inf.CreateEndpoint(ipb.CreateEndpointRequest(endpoint=ipb.Endpoint(name=ENDPOINT, policy=policy)),
                       metadata=md, timeout=60)
    inf.LoadModel(ipb.LoadModelRequest(model=MODEL, version=mv.version), metadata=md, timeout=60)
    feat = features_pb2_grpc.FeatureServiceStub(platform.channel("features"))
    feat.ApplyEntity(fpb.ApplyEntityRequest(entity=fpb.Entity(name=ENTITY, join_key=JOIN_KEY,
                                                             value_type=fpb.VALUE_TYPE_INT64)), metadata=md)
    feat.ApplyFeatureView(fpb.ApplyFeatureViewRequest(feature_view=fpb.FeatureView(
        name=VIEW, entities=[ENTITY], ttl_seconds=3600, features=[
            fpb.Feature(name="spend", dtype=types_pb2.DATA_TYPE_FLOAT64),
            fpb.Feature(name="segment", dtype=types_pb2.DATA_TYPE_STRING)])), metadata=md)
    feat.PushFeatures(fpb.PushFeaturesRequest(
        view=VIEW, entities={JOIN_KEY: fpb.EntityColumn(int64_values=[1, 2])},
        event_timestamps_us=[1_700_000_000_000_000] * 2,
        features=[fpb.FeatureValues(name="spend", double_values=[1.0, 2.0]),
                  fpb.FeatureValues(name="segment", string_values=["a", "b"])]), metadata=md)
    return Seeded(mv.version, [_entity_table()])


@dataclass
class Failure:
    rpc: Rpc
    kind: str
    input: str
    status: str
    details: str
    request_id: str
    saved: str = ""
    traceback: str = ""

    def __str__(self) -> str:
        out = (f"{self.rpc.path} [{self.kind}] -> {self.status}: {self.details[:300]!r}\n"
               f"    input: {self.input}\n    request id: {self.request_id}")
        if self.saved:
            out += f"\n    request bytes: {self.saved}"
        if self.traceback:
            out += "\n    server traceback:\n      " + self.traceback[-2500:].replace("\n", "\n      ")
        return out


def _problem(out: Outcome) -> str:
    """What is wrong with an answer, or "" (any status the service chose is fine)."""
    if out.code in BAD:
        return out.code.name
    if out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size" in out.details:
        return "RESOURCE_EXHAUSTED (the error message was too long for the client)"
    if len(out.details) > MAX_DETAILS:
        return f"{out.code.name} with a {len(out.details)}-character message"
    return ""


class Fuzzer:
    def __init__(self, platform: Platform, service: str) -> None:
        self.p = platform
        self.service = service
        self.failures: list[Failure] = []
        self.calls = 0
        self._ids = itertools.count(1)
        self.crashed = False
        self.saved_dir = platform.sandbox / "fuzz-failures" / service
        self.statuses: dict[str, int] = {}
        self.per_method: dict[str, dict[str, int]] = {}

    def call(self, rpc: Rpc, kind: str, payload: bytes, message: object = None) -> None:
        if self.crashed:
            return
        rid = f"fuzz-{self.service}-{next(self._ids)}"
        out = invoke(self.p.channel(self.service), rpc.method, rpc.path, payload,
                     [*self.p.auth("admin"), ("x-request-id", rid)], timeout=CALL_TIMEOUT)
        self.calls += 1
        self.statuses[out.code.name] = self.statuses.get(out.code.name, 0) + 1
        per = self.per_method.setdefault(rpc.method.name, {})
        per[out.code.name] = per.get(out.code.name, 0) + 1
        alive = self.p.alive(self.service)
        problem = _problem(out)
        if problem or not alive:
            self.saved_dir.mkdir(parents=True, exist_ok=True)
            saved = self.saved_dir / f"{rpc.method.name}-{rid}.bin"
            saved.write_bytes(payload)
            tb = "\n".join(r.get("exc", "") for r in self.p.log_records(self.service, rid) if r.get("exc"))
            status = problem or out.code.name
            if not alive:
                status += f", then the process died (exit {self.p.procs[self.service].returncode})"
            if not alive:
                self.crashed = True
                tb = tb or self.p.log_tail(self.service)
            self.failures.append(Failure(rpc, kind, describe(payload, message), status, out.details, rid,
                                         str(saved), tb))

    def check_health(self, rpc: Rpc) -> None:
        if self.crashed:
            return
        if not self.p.alive(self.service):
            self.crashed = True
            self.failures.append(Failure(rpc, "after the method", "", "process exited", "", "",
                                         traceback=self.p.log_tail(self.service)))
            return
        health = self.p.health(self.service)
        if health != "SERVING":
            self.failures.append(Failure(rpc, "after the method", "", f"health {health}", "", ""))

    def fuzz(self, rpc: Rpc, builders: tuple[Builder, Builder]) -> None:
        for label, payload in malformed(rpc.method.input_type):
            self.call(rpc, f"malformed: {label}", payload)
        base = base_message(rpc.method.input_type, builders[1].hints)
        for label, message in boundary_cases(rpc.method.input_type, base):
            self.call(rpc, f"boundary: {label}", message.SerializeToString(), message)
        hostile, plausible = (b.message(rpc.method.input_type) for b in builders)
        messages = st.one_of(hostile, plausible)
        encoded = messages.map(lambda m: ("message", m.SerializeToString(), m))
        truncated = messages.map(lambda m: m.SerializeToString()).filter(len).flatmap(
            lambda b: st.integers(1, max(1, len(b) - 1)).map(lambda i: ("truncated message", b[:i], None)))
        raw = st.binary(min_size=1, max_size=512).map(lambda b: ("random bytes", b, None))

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck),
                  print_blob=False)
        @given(st.one_of(encoded, encoded, truncated, raw))
        def run(case: tuple[str, bytes, object]) -> None:
            kind, payload, message = case
            self.call(rpc, kind, payload, message)

        run()


def _sandbox_file(p: Platform) -> callable:
    return lambda name: str(p.sandbox / name)


# Inference and monitoring first and the registry last: an admin's fuzzed DeleteRegisteredModel may
# well name the seeded model, and the draws of the services that read it should still find it.
@pytest.mark.parametrize("service", sorted(SERVICES, key=("inference", "monitoring", "training", "features",
                                                          "registry").index))
def test_fuzz(platform: Platform, seeded: Seeded, service: str) -> None:
    rpcs = [r for r in all_rpcs() if r.process == service]
    assert rpcs
    pool = default_pool(_sandbox_file(platform), [str(h / "artifacts") for h in platform.homes.values()])
    builders = (Builder(pool, SEEDED_NAMES, blobs=seeded.blobs),
                Builder(pool, SEEDED_NAMES, plausible=True, blobs=seeded.blobs, hints=seeded.hints(service)))
    fz = Fuzzer(platform, service)
    for rpc in rpcs:
        fz.fuzz(rpc, builders)
        fz.check_health(rpc)
        if fz.crashed:
            break
    print(f"\n{service}: {fz.calls} calls over {len(rpcs)} methods; "
          f"statuses {dict(sorted(fz.statuses.items()))}")
    if os.environ.get("STRATA_FUZZ_VERBOSE"):
        for name, counts in fz.per_method.items():
            print(f"  {name}: {dict(sorted(counts.items()))}")
    assert not fz.failures, \
        f"{service}: {len(fz.failures)} failures in {fz.calls} calls\n" + report(fz.failures)


def report(failures: list[Failure]) -> str:
    """Failures grouped by method, status and cause (the traceback's last line): one example in
    full per group, the other inputs of the group by label."""
    groups: dict[tuple[str, str, str], list[Failure]] = {}
    for f in failures:
        cause = (f.traceback.strip().splitlines() or [f.details])[-1][:200]
        key = re.sub(r"-?\d+", "N", cause)  # one group for one cause, whatever the value
        groups.setdefault((f.rpc.path, f.status.split(",")[0], key), []).append(f)
    out = []
    for (path, status, cause), group in groups.items():
        out.append(f"== {path} -> {status} x{len(group)}: {cause}\n{group[0]}")
        if len(group) > 1:
            more = " ..." if len(group) > 12 else ""
            out.append("    also: " + "; ".join(f.kind for f in group[1:12]) + more)
    return "\n".join(out)


def _files_under(root: Path) -> Iterator[Path]:
    for dirpath, dirs, files in os.walk(root):
        for f in [*files, *dirs]:
            yield Path(dirpath) / f


def test_fuzz_wrote_nothing_outside_the_service_homes(platform: Platform) -> None:
    """The hostile paths the fuzz sent climb at most 6 directories or name the sandbox, and all
    end in CANARY: a file anywhere in the sandbox but a service's home (or the suite's own
    fuzz-failures/) escaped, and so did a CANARY file beside the services' working directory
    (the repository) or above it, or in /tmp. Those are removed once reported."""
    assert SANDBOX_DEPTH > 6
    allowed = [*platform.homes.values(), platform.sandbox / "fuzz-failures"]
    escaped = [str(f) for f in _files_under(platform.sandbox)
               if not any(f.is_relative_to(a) or a.is_relative_to(f) for a in allowed)]
    near = [ROOT, *ROOT.parents, Path("/tmp")]
    outside = sorted({str(d / n) for d in near if d.is_dir() for n in os.listdir(d) if n.startswith(CANARY)})
    for path in outside:  # ours, by name: leave nothing on the host
        shutil.rmtree(path) if Path(path).is_dir() else Path(path).unlink()
    assert not escaped + outside, "files written outside every service's home:\n  " + "\n  ".join(
        sorted(escaped) + outside)
