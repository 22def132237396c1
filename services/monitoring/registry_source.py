"""The reference store's model catalog: the registry service, through its client. Converts the
registry's ModelVersion into the plain `ModelInfo` and its statuses into errors."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from services.clients.registry import RegistryClient
from services.common.peer import peer_error
from services.monitoring.references import version_name
from services.monitoring.types import ModelInfo, TensorSpec


class RegistryCatalog:
    """Describes model versions from the registry (a `references.ModelCatalog`)."""

    def __init__(self, client_factory: Callable[[], RegistryClient]) -> None:
        self._factory = client_factory
        self._client: RegistryClient | None = None

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = self._factory()
        return self._client

    def describe(self, model: str, version: int) -> ModelInfo:
        try:
            mv = self.client.resolve(model, version)
        except grpc.RpcError as e:
            raise peer_error(e, "the registry", version_name(model, version)) from None
        sig = mv.signature
        return ModelInfo(mv.name, mv.version, tuple(TensorSpec(t.name, tuple(t.shape)) for t in sig.inputs),
                         tuple(TensorSpec(t.name, tuple(t.shape)) for t in sig.outputs), mv.lineage.dataset_uri,
                         tuple(mv.lineage.features))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

