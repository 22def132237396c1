"""Access rules of the KServe V2 / Open Inference Protocol methods.

The protocol's proto is fixed, so it cannot carry Strata's access option; the rules are declared
here once, for the inference service's interceptor (services/inference/app.py passes them as
`Service.extra_policies`) and the gateway's RBAC (gateway/config.py). They are contract data, what
the proto option says for the `strata.*` services, so they sit beside policy.py in the shared
runtime: the gateway reads every access rule from services/common and imports no service.
Pure data: importing it does not load the protocol's generated module.
"""

from __future__ import annotations

from services.common.policy import MethodPolicy

V2_SERVICE = "inference.GRPCInferenceService"
_PUBLIC, _VIEWER, _DEVELOPER = 0, 1, 2


def _p(method: str, role: int, mutates: bool = False) -> MethodPolicy:
    # The protocol has no HTTP paths to name resources by: its mutating calls act on a model.
    return MethodPolicy(f"/{V2_SERVICE}/{method}", role, mutates, "models/{model_name}" if mutates else "")


# Probes are public (as gRPC health is), reads and inference need viewer, loads need developer.
V2_POLICIES: dict[str, MethodPolicy] = {p.path: p for p in [
    _p("ServerLive", _PUBLIC), _p("ServerReady", _PUBLIC), _p("ServerMetadata", _PUBLIC),
    _p("ModelReady", _VIEWER), _p("ModelMetadata", _VIEWER), _p("ModelInfer", _VIEWER),
    _p("ModelConfig", _VIEWER), _p("ModelStatistics", _VIEWER), _p("RepositoryIndex", _VIEWER),
    _p("RepositoryModelLoad", _DEVELOPER, True), _p("RepositoryModelUnload", _DEVELOPER, True),
]}
