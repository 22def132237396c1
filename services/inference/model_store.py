"""The models a serving process holds: fetched from the registry by name and version or alias,
sha256-verified before every load, warmed before they report ready, and kept within a memory
budget (the least recently used model is unloaded first).

Artifacts are cached on local disk by checksum (shared by the serving processes of one machine);
a cached file is hashed again before it is loaded, so a corrupted or tampered cache is refused.

Versions come from a `ModelSource`: the registry, through services/inference/registry_source.py
(given by the wiring).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from services.common.errors import FailedPrecondition, StrataError
from services.inference.batching import Batcher, BatchingConfig
from services.inference.entity_features import Binding, FeatureLineage, bind
from services.inference.runtime import ModelRuntime, TensorInfo

log = logging.getLogger("strata.inference.models")


@dataclass(frozen=True)
class ModelRef:
    model: str
    version: int


@dataclass(frozen=True, slots=True)
class SourceVersion:
    """A READY ONNX version as the source describes it: what loading it needs."""

    model: str
    version: int
    sha256: str
    allow_nan: bool = False
    features: FeatureLineage | None = None  # what serving by entity key reads (its lineage)


class ModelSource(Protocol):
    """Where model versions come from (the registry). Called from worker threads; errors are
    StrataErrors naming the model (NOT_FOUND, INVALID_ARGUMENT, FAILED_PRECONDITION, UNAVAILABLE)."""

    def resolve(self, model: str, version: int = 0, alias: str = "") -> SourceVersion:
        """A READY version: by number, by alias, or the newest when neither is given."""
        ...

    def approved_versions(self, model: str) -> set[int]:
        """The versions that went through the registry's promotion approval (governance.py)."""
        ...

    def fetch(self, version: SourceVersion, dest: Path) -> None:
        """The artifact, written to `dest`."""
        ...

    def close(self) -> None: ...


@dataclass
class LoadedModel:
    ref: ModelRef
    runtime: ModelRuntime
    sha256: str
    loaded_at: float
    batchers: dict[BatchingConfig, Batcher] = field(default_factory=dict)
    features: FeatureLineage | None = None
    #: The inputs by name, for decoding requests (built once, not per request).
    specs: dict[str, TensorInfo] = field(init=False, repr=False)
    _binding: Binding | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.specs = {i.name: i for i in self.runtime.inputs}

    @property
    def binding(self) -> Binding:
        """The inputs matched to the lineage's features (serving by entity key), made once."""
        if self._binding is None:
            self._binding = bind(f"models/{self.ref.model}/versions/{self.ref.version}", self.features, self.specs)
        return self._binding

    def batcher(self, config: BatchingConfig) -> Batcher:
        b = self.batchers.get(config)
        if b is None:
            b = self.batchers[config] = Batcher(self.runtime, config, self.ref.model, self.ref.version)
        return b

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()


class ModelState(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A model version this process holds, is loading, or failed to load (`reason`)."""

    model: str
    version: int
    state: ModelState
    reason: str = ""
    loaded: LoadedModel | None = None  # READY


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ModelStore:
    def __init__(self, source: ModelSource, cache_dir: Path, *, memory_budget_bytes: int,
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

    def versions_of(self, model: str) -> list[int]:
        return sorted(r.version for r in self._loaded if r.model == model)

    def statuses(self) -> list[ModelStatus]:
        """The loaded models, then those loading, then those that failed."""
        return ([ModelStatus(m.ref.model, m.ref.version, ModelState.READY, loaded=m) for m in self._loaded.values()]
                + [ModelStatus(r.model, r.version, ModelState.LOADING) for r in self._loading]
                + [ModelStatus(r.model, r.version, ModelState.FAILED, why) for r, why in self.failures.items()])

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
            runtime, mv = await asyncio.to_thread(self._prepare, ref)
        except StrataError as e:
            self.failures[ref] = e.message
            raise
        except Exception as e:
            self.failures[ref] = f"{type(e).__name__}: {e}"
            log.exception("model load failed", extra={"fields": {"model": ref.model, "version": ref.version}})
            raise FailedPrecondition(f"models/{ref.model}/versions/{ref.version} could not be loaded: {e}") from e
        self.failures.pop(ref, None)
        await self._make_room(runtime.memory_bytes)
        m = self._loaded[ref] = LoadedModel(ref, runtime, mv.sha256, time.time(), features=mv.features)
        log.info("model ready", extra={"fields": {
            "model": ref.model, "version": ref.version, "provider": runtime.provider,
            "seconds": round(time.perf_counter() - started, 3), "max_batch": runtime.max_batch_size}})
        return m

    def _prepare(self, ref: ModelRef) -> tuple[ModelRuntime, SourceVersion]:
        """Runs in a thread: fetch (or reuse the cache), verify, open the session, warm up."""
        mv = self.source.resolve(ref.model, ref.version)
        want = mv.sha256
        path = self.cache_dir / f"{want}.onnx"
        if not path.exists():
            self.source.fetch(mv, path)
        got = sha256_file(path)
        if got != want:
            path.unlink(missing_ok=True)  # the next load fetches a fresh copy
            raise FailedPrecondition(f"models/{ref.model}/versions/{ref.version}: artifact sha256 {got} does not "
                                     f"match the registry's {want}; refusing to load it")
        runtime = ModelRuntime(path, intra_op_threads=self._threads, device=self._device,
                               max_batch_size=self._max_batch, allow_nan=mv.allow_nan)
        runtime.warm_up()
        return runtime, mv

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
