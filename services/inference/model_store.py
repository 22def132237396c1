"""The models a serving process holds: fetched from the registry by name and version or alias,
sha256-verified before every load, warmed before they report ready, and kept within a memory
budget (the least recently used model is unloaded first).

Artifacts are cached on local disk by checksum (shared by the serving processes of one machine);
a cached file is hashed again before it is loaded, so a corrupted or tampered cache is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from strata.registry.v1 import registry_pb2 as rpb

from services.clients.registry import RegistryClient
from services.common.errors import (
    FailedPrecondition, InvalidArgument, NotFound, StrataError, Unavailable, quote,
)
from services.common.limits import check_version
from services.inference.batching import Batcher, BatchingConfig
from services.inference.runtime import ModelRuntime

log = logging.getLogger("strata.inference.models")


@dataclass(frozen=True)
class ModelRef:
    model: str
    version: int


@dataclass
class LoadedModel:
    ref: ModelRef
    runtime: ModelRuntime
    sha256: str
    loaded_at: float
    batchers: dict[BatchingConfig, Batcher] = field(default_factory=dict)

    def batcher(self, config: BatchingConfig) -> Batcher:
        b = self.batchers.get(config)
        if b is None:
            b = self.batchers[config] = Batcher(self.runtime, config, self.ref.model, self.ref.version)
        return b

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class RegistrySource:
    """Reads model versions from the registry service."""

    def __init__(self, client_factory: Callable[[], RegistryClient]) -> None:
        self._factory = client_factory
        self._client: RegistryClient | None = None

    @property
    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = self._factory()
        return self._client

    def resolve(self, model: str, version: int = 0, alias: str = "") -> rpb.ModelVersion:
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
        return mv

    def approved_versions(self, model: str) -> set[int]:
        """The versions of a model that went through the registry's promotion approval (an
        APPROVED promotion: requested by one principal, approved by another with the approver
        role), whether or not an alias still points at them."""
        try:
            return {p.version for p in self.client.list_all_promotions(model, rpb.PROMOTION_STATE_APPROVED)}
        except grpc.RpcError as e:
            raise _registry_error(e, model, 0, "") from None

    def fetch(self, mv: rpb.ModelVersion, dest: Path) -> None:
        try:
            self.client.download_artifact(mv.name, mv.version, dest)
        except grpc.RpcError as e:
            raise _registry_error(e, mv.name, mv.version, "") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _registry_error(e: grpc.RpcError, model: str, version: int, alias: str) -> StrataError:
    what = f"models/{quote(model, bare=True)}" + (f"/versions/{version}" if version else
                                                  f"/aliases/{quote(alias, bare=True)}" if alias else "")
    code = e.code()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what} not found in the registry")
    if code == grpc.StatusCode.INVALID_ARGUMENT:  # the caller's name, version or alias: still the caller's fault
        field, _, problem = (e.details() or "").partition(": ")  # type: ignore[attr-defined]
        return InvalidArgument({"name": "model"}.get(field, field) if problem else "model",
                               f"{problem or field} (the registry refused {what})")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"registry unreachable while resolving {what}: {e.details()}")  # type: ignore[attr-defined]
    return FailedPrecondition(f"registry refused {what}: {code.name} {e.details()}")  # type: ignore[attr-defined]


class ModelStore:
    def __init__(self, source: RegistrySource, cache_dir: Path, *, memory_budget_bytes: int,
                 intra_op_threads: int, device: str = "auto", max_batch_size: int = 1024) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self.budget = memory_budget_bytes
        self._threads = intra_op_threads
        self._device = device
        self._max_batch = max_batch_size
        self._loaded: OrderedDict[ModelRef, LoadedModel] = OrderedDict()  # LRU order, oldest first
        self._loading: dict[ModelRef, asyncio.Task[LoadedModel]] = {}
        self.failures: dict[ModelRef, str] = {}
        #: Models in use by a current policy are unloaded only when nothing else can go.
        self.pinned: Callable[[], set[ModelRef]] = set

    # -- lookups on the hot path ---------------------------------------------------------------
    def get(self, ref: ModelRef) -> LoadedModel | None:
        m = self._loaded.get(ref)
        if m is not None:
            self._loaded.move_to_end(ref)
        return m

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def loading(self) -> list[ModelRef]:
        return list(self._loading)

    def versions_of(self, model: str) -> list[int]:
        return sorted(r.version for r in self._loaded if r.model == model)

    # -- loading -------------------------------------------------------------------------------
    async def resolve(self, model: str, version: int = 0, alias: str = "") -> ModelRef:
        mv = await asyncio.to_thread(self.source.resolve, model, version, alias)
        return ModelRef(model, mv.version)

    async def approved_versions(self, model: str) -> set[int]:
        return await asyncio.to_thread(self.source.approved_versions, model)

    async def load(self, ref: ModelRef) -> LoadedModel:
        """Load (once, however many callers ask at the same time) and warm a model version."""
        if (m := self.get(ref)) is not None:
            return m
        task = self._loading.get(ref)
        if task is None:
            task = self._loading[ref] = asyncio.get_running_loop().create_task(self._load(ref))
            task.add_done_callback(lambda _t: self._loading.pop(ref, None))
        return await asyncio.shield(task)

    async def _load(self, ref: ModelRef) -> LoadedModel:
        started = time.perf_counter()
        try:
            runtime, sha = await asyncio.to_thread(self._prepare, ref)
        except StrataError as e:
            self.failures[ref] = e.message
            raise
        except Exception as e:
            self.failures[ref] = f"{type(e).__name__}: {e}"
            log.exception("model load failed", extra={"fields": {"model": ref.model, "version": ref.version}})
            raise FailedPrecondition(f"models/{ref.model}/versions/{ref.version} could not be loaded: {e}") from e
        self.failures.pop(ref, None)
        await self._make_room(runtime.memory_bytes)
        m = self._loaded[ref] = LoadedModel(ref, runtime, sha, time.time())
        log.info("model ready", extra={"fields": {
            "model": ref.model, "version": ref.version, "provider": runtime.provider,
            "seconds": round(time.perf_counter() - started, 3), "max_batch": runtime.max_batch_size}})
        return m

    def _prepare(self, ref: ModelRef) -> tuple[ModelRuntime, str]:
        """Runs in a thread: fetch (or reuse the cache), verify, open the session, warm up."""
        mv = self.source.resolve(ref.model, ref.version)
        want = mv.artifact.sha256
        path = self.cache_dir / f"{want}.onnx"
        if not path.exists():
            self.source.fetch(mv, path)
        got = sha256_file(path)
        if got != want:
            path.unlink(missing_ok=True)  # the next load fetches a fresh copy
            raise FailedPrecondition(f"models/{ref.model}/versions/{ref.version}: artifact sha256 {got} does not "
                                     f"match the registry's {want}; refusing to load it")
        runtime = ModelRuntime(path, intra_op_threads=self._threads, device=self._device,
                               max_batch_size=self._max_batch, allow_nan=mv.signature.allow_nan)
        runtime.warm_up()
        return runtime, want

    async def _make_room(self, need: int) -> None:
        used = sum(m.runtime.memory_bytes for m in self._loaded.values())
        if used + need <= self.budget:
            return
        pinned = self.pinned()
        # Unpinned models first, least recently used first; pinned ones only as a last resort.
        order = [r for r in self._loaded if r not in pinned] + [r for r in self._loaded if r in pinned]
        for ref in order:
            if used + need <= self.budget:
                break
            used -= self._loaded[ref].runtime.memory_bytes
            await self.unload(ref, reason="memory budget")

    async def unload(self, ref: ModelRef, reason: str = "requested") -> bool:
        m = self._loaded.pop(ref, None)
        if m is None:
            return False
        await m.close()
        log.info("model unloaded", extra={"fields": {"model": ref.model, "version": ref.version, "reason": reason}})
        return True

    async def close(self) -> None:
        for ref in list(self._loaded):
            await self.unload(ref, reason="shutdown")
        self.source.close()
