"""The model store's source of versions: the registry service, through its client. Converts the
registry's messages and statuses into the model store's plain `SourceVersion` and errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
from strata.registry.v1 import registry_pb2 as rpb

from services.clients.registry import RegistryClient
from services.common.errors import (
    FailedPrecondition,
    NotFound,
    StrataError,
    quote,
)
from services.common.limits import check_version
from services.common.peer import peer_error
from services.inference.entity_features import FeatureLineage
from services.inference.model_store import SourceVersion


class RegistrySource:
    """Reads model versions from the registry service (a `ModelSource`)."""

    def __init__(self, client_factory: Callable[[], RegistryClient]) -> None:
        self._factory = client_factory
        self._client: RegistryClient | None = None

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = self._factory()
        return self._client

    def resolve(self, model: str, version: int = 0, alias: str = "") -> SourceVersion:
        """A READY version: by number, by alias, or the newest when neither is given."""
        check_version(version, "version", optional=True)  # (callers name their own field first)
        try:
            if version or alias:
                mv = self.client.resolve(model, version, alias)
            else:
                ready = [v for v in self.client.list_all_versions(model)
                         if v.status == rpb.MODEL_VERSION_STATUS_READY]
                if not ready:
                    raise NotFound(f"model {quote(model)} has no version with an artifact")
                mv = max(ready, key=lambda v: v.version)
        except grpc.RpcError as e:
            raise _registry_error(e, model, version, alias) from None
        if mv.status != rpb.MODEL_VERSION_STATUS_READY:
            raise FailedPrecondition(f"models/{quote(model, bare=True)}/versions/{mv.version} has no committed "
                                     "artifact yet")
        if mv.framework and mv.framework.lower() != "onnx":
            raise FailedPrecondition(f"models/{quote(model, bare=True)}/versions/{mv.version} is {mv.framework}, "
                                     "not ONNX")
        lin = mv.lineage
        return SourceVersion(mv.name, mv.version, mv.artifact.sha256, mv.signature.allow_nan,
                             FeatureLineage.of(lin.features, lin.feature_views, lin.feature_set))

    def approved_versions(self, model: str) -> set[int]:
        """The versions of a model that went through the registry's promotion approval (an
        APPROVED promotion: requested by one principal, approved by another with the approver
        role), whether or not an alias still points at them."""
        try:
            return {p.version for p in self.client.list_all_promotions(model, rpb.PROMOTION_STATE_APPROVED)}
        except grpc.RpcError as e:
            raise _registry_error(e, model, 0, "") from None

    def fetch(self, version: SourceVersion, dest: Path) -> None:
        try:
            self.client.download_artifact(version.model, version.version, dest)
        except grpc.RpcError as e:
            raise _registry_error(e, version.model, version.version, "") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _registry_error(e: grpc.RpcError, model: str, version: int, alias: str) -> StrataError:
    what = f"models/{quote(model, bare=True)}" + (f"/versions/{version}" if version else
                                                  f"/aliases/{quote(alias, bare=True)}" if alias else "")
    # (the caller's name, version or alias refused: still the caller's fault)
    return peer_error(e, "the registry", what, caller_field=lambda field: {"name": "model", "": "model"}.get(field, field))
