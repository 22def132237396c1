"""The inference service's data plane: the one place that decides, for every protocol. The
servicers (server.py for strata.inference.v1, v2.py for the KServe V2 protocol) turn a request
into the plain values below, await one call here and turn its plain result into a reply; REST
reaches the same calls through the gateway's transcoding.

Predictions: routing (the endpoint's route picks a version), decoding the inputs against the
chosen model's signature (tensors.py), batching and the prediction log (routing.Engine).
Models: ready, metadata, load, unload, what is loaded. Endpoints: create, update, delete, set
policy, rollback, statistics, with alias resolution, the approval checks of production endpoints
(governance.py) and preloading before a policy is published.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.common.audit import current_resource
from services.common.auth import Principal
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, quote
from services.common.limits import check_version
from services.common.paging import PageRequest
from services.inference.batching import BatchingConfig
from services.inference.endpoints import (
    EndpointRecord, RevisionRecord, create_payload, validate_name, validate_policy,
)
from services.inference.entities import TargetStats, TrafficPolicy
from services.inference.entity_features import EntityFeatures
from services.inference.governance import is_approver, require_approved
from services.inference.model_store import LoadedModel, ModelRef, ModelStatus
from services.inference.routing import Engine, Result
from services.inference.tensors import InputTensor, decode_rows, decode_tensors, decode_v2_inputs


@dataclass(slots=True)
class PredictRequest:
    """Strata Predict: `inputs`, `rows` or `entities` (one of them; the converter refuses more and
    none). `output_names`: the outputs to return, in the model's order (all when empty)."""

    endpoint: str
    inputs: Sequence[InputTensor]
    rows: Sequence[dict[str, object]]
    routing_key: str
    output_names: Sequence[str]
    request_id: str
    entities: Sequence[dict[str, object]] = ()  # {join key: key} per row: features read online


@dataclass(slots=True)
class InferRequest:
    """KServe V2 ModelInfer. `model` names an endpoint (routed by its policy) or a loaded model
    (`version`: the version as text; empty: the endpoint, else the newest loaded). `raw_count`:
    how many raw contents the request carried. `outputs`: the outputs to return, in this order."""

    model: str
    version: str
    inputs: Sequence[InputTensor]
    raw_count: int
    routing_key: str
    outputs: Sequence[str]
    request_id: str


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """A loaded model's figures summed over its batchers (V2 ModelStatistics)."""

    model: str
    version: int
    batchers: int = 0
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    queue_ns: int = 0
    compute_ns: int = 0


def parse_version(text: str, field: str, *, optional: bool = False) -> int:
    """A version given as text ("3", as V2 names them) as a version number (1..MAX_VERSION; "0"
    too when optional)."""
    try:
        number = int(text)
    except ValueError:
        raise InvalidArgument(field, f"{quote(text)} is not a version number") from None
    return check_version(number, field, optional=optional)


def _status_key(m: ModelStatus) -> tuple:
    return (m.model, m.version, m.state.value)


class DataPlane:
    def __init__(self, engine: Engine, ready: asyncio.Event | None = None,
                 entity_features: EntityFeatures | None = None) -> None:
        self.engine = engine
        self.entity_features = entity_features
        self.store = engine.store
        self.endpoints = engine.endpoints
        self._ready = ready

    @property
    def default_batching(self) -> BatchingConfig:
        return self.engine.default_batching

    def ready(self) -> bool:
        """Started, and every endpoint's newest revision applied in this process."""
        return self._ready is not None and self._ready.is_set() and not self.engine.failures

    # -- predictions -----------------------------------------------------------------------------
    async def predict(self, req: PredictRequest) -> Result:
        route = self.engine.route(req.endpoint)
        ref = route.pick(req.routing_key)
        model = self.store.get(ref) or await self.store.load(ref)
        if req.output_names:  # refused before the model runs: a bad request is neither served nor logged
            _known_outputs(model.runtime.output_names, req.output_names, lambda i, _n: f"output_names[{i}]")
        if req.entities:
            feeds = await self._entity_feeds(model, req.entities)
        else:
            feeds = decode_rows(req.rows, model.specs) if req.rows else decode_tensors(req.inputs, model.specs)
        result = await self.engine.serve(route, model, feeds, req.request_id)
        if req.output_names:
            result.outputs = _model_order(result.outputs, req.output_names)
        return result

    async def _entity_feeds(self, model: LoadedModel, entities: Sequence[dict[str, object]]) -> dict:
        binding = model.binding  # FAILED_PRECONDITION for a model not trained from the feature store
        if self.entity_features is None:
            raise FailedPrecondition("this inference service reads no feature store: send inputs or rows")
        return await self.entity_features.feeds(binding, f"models/{model.ref.model}/versions/{model.ref.version}",
                                                entities)

    async def model_infer(self, req: InferRequest) -> Result:
        if not req.model:
            raise InvalidArgument("model_name", "model name is required")
        route = self.engine.routes.get(req.model)
        if route is not None and not req.version:
            ref = route.pick(req.routing_key)
            model = self.store.get(ref) or await self.store.load(ref)
        else:
            route, model = None, self.model(req.model, req.version)
        if req.outputs:
            _known_outputs(model.runtime.output_names, req.outputs, lambda _i, n: f"outputs[{quote(n, bare=True)}]")
        feeds = decode_v2_inputs(req.inputs, req.raw_count)
        if route is not None:
            result = await self.engine.serve(route, model, feeds, req.request_id)
        else:
            result = await self.engine.infer_model(model, feeds, req.request_id)
        if req.outputs:
            result.outputs = _requested_order(result.outputs, req.outputs)
        return result

    # -- models ------------------------------------------------------------------------------------
    def model(self, name: str, version: str, field: str = "model_name") -> LoadedModel:
        """The loaded model `name` names: an endpoint's first target (no version given), else the
        model's `version`, else its newest loaded version."""
        if not name:
            raise InvalidArgument(field, "model name is required")
        route = self.engine.routes.get(name)
        if route is not None and not version:
            m = self.store.get(route.targets[0])
            if m is not None:
                return m
        if version:
            version_field = "version" if field == "name" else "model_version"
            ref = ModelRef(name, parse_version(version, version_field))
            m = self.store.get(ref)
            if m is None:
                raise NotFound(f"model {quote(name)} version {ref.version} is not loaded")
            return m
        versions = self.store.versions_of(name)
        if not versions:
            raise NotFound(f"model {quote(name)} is not loaded (load it with RepositoryModelLoad, or deploy an "
                           "endpoint)")
        return self.store.get(ModelRef(name, versions[-1]))  # type: ignore[return-value]

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.model(name, version, "name")
        except NotFound:
            return False
        return True

    def model_versions(self, model: str) -> list[int]:
        """The versions of `model` loaded here."""
        return self.store.versions_of(model)

    def model_statistics(self, name: str, version: str) -> list[ModelStatistics]:
        """Of the model `name` names, or of every loaded model when no name is given."""
        models = [self.model(name, version, "name")] if name else self.store.loaded()
        out = []
        for m in models:
            inferences = executions = last = queue_ns = compute_ns = 0
            for b in m.batchers.values():
                s = b.stats
                inferences += s.inference_count
                executions += s.execution_count
                last = max(last, s.last_inference_ms)
                queue_ns += s.queue_ns
                compute_ns += s.compute_ns
            out.append(ModelStatistics(m.ref.model, m.ref.version, len(m.batchers), inferences, executions, last,
                                       queue_ns, compute_ns))
        return out

    def statuses(self) -> list[ModelStatus]:
        """This process's models: loaded, loading, failed."""
        return self.store.statuses()

    def list_loaded(self, page_size: int, page_token: str) -> tuple[list[ModelStatus], str]:
        """This process's models, paged like every list: by (model, version, state)."""
        page = PageRequest.parse("ListLoadedModels", page_size, page_token, key=list)
        models = sorted(self.store.statuses(), key=_status_key)
        if page.after is not None:
            after = tuple(page.after)
            if [type(v) for v in after] != [str, int, str]:
                raise InvalidArgument("page_token", "is not a token returned by this list with these filters")
            models = [m for m in models if _status_key(m) > after]
        return page.cut(models, lambda m: list(_status_key(m)))

    async def load_model(self, model: str, version: int, alias: str, *, field: str = "model") -> LoadedModel:
        if not model:
            raise InvalidArgument(field, "model name is required")
        check_version(version, "version", optional=True)
        ref = await self.store.resolve(model, version, alias)
        current_resource.set(f"models/{ref.model}/versions/{ref.version}")
        return await self.store.load(ref)

    async def unload_model(self, model: str, version: int) -> None:
        current_resource.set(f"models/{model}/versions/{version}")
        check_version(version, "version")
        if not await self.store.unload(ModelRef(model, version)):
            raise NotFound(f"models/{quote(model, bare=True)}/versions/{version} is not loaded")

    async def unload_all(self, model: str) -> None:
        """Every loaded version of `model` (V2 RepositoryModelUnload)."""
        versions = self.store.versions_of(model)
        if not versions:
            raise NotFound(f"model {quote(model)} is not loaded")
        current_resource.set(f"models/{model}")
        for v in versions:
            await self.store.unload(ModelRef(model, v))

    # -- endpoints ---------------------------------------------------------------------------------
    async def get_endpoint(self, name: str) -> EndpointRecord:
        return await asyncio.to_thread(self.endpoints.get, name)

    async def list_endpoints(self, page_size: int, page_token: str) -> tuple[list[EndpointRecord], str]:
        return await asyncio.to_thread(self.endpoints.list, page_size, page_token)

    async def list_revisions(self, endpoint: str, page_size: int,
                             page_token: str) -> tuple[list[RevisionRecord], str]:
        return await asyncio.to_thread(self.endpoints.revisions, endpoint, page_size, page_token)

    async def create_endpoint(self, name: str, description: str, policy: TrafficPolicy, production: bool,
                              request_id: str, principal: Principal) -> EndpointRecord:
        current_resource.set(f"endpoints/{name}")
        if not name:
            raise InvalidArgument("endpoint.name", "endpoint name is required")
        validate_name(name)
        validate_policy(policy, "endpoint.policy")  # before the registry is asked anything
        payload = create_payload(name, description, policy, production)  # as given: aliases unresolved
        first = await asyncio.to_thread(self.endpoints.created, principal.subject, request_id, payload)
        if first is not None:
            return first  # a retry: the first result
        resolved = await self._resolve_policy(policy, "endpoint.policy")
        if production:
            await self._require_approved(name, resolved, field="endpoint.policy")
        await self._preload(resolved)
        rec = await asyncio.to_thread(self.endpoints.create, name, description, resolved, principal.subject,
                                      request_id, production=production, payload=payload)
        await self.engine.publish(rec.name, rec.revision)
        return rec

    async def update_endpoint(self, name: str, paths: set[str], description: str, production: bool,
                              principal: Principal) -> EndpointRecord:
        """Change the fields named in `paths` (description, production) to the values given."""
        current_resource.set(f"endpoints/{name}")
        if not paths:
            raise InvalidArgument("update_mask", "name the fields to change: description, production")
        if unknown := paths - {"description", "production"}:
            hint = " (the policy changes through SetTrafficPolicy)" if "policy" in unknown else ""
            raise InvalidArgument("update_mask", f"paths must be among description, production; got "
                                  f"{sorted(p[:64] for p in unknown)[:5]}{hint}")
        rec = await asyncio.to_thread(self.endpoints.get, name)
        checked = 0
        if "production" in paths and production != rec.production:
            if production:  # the current policy must pass, as any later one will have to
                await self._require_approved(rec.name, rec.policy, source="its current policy")
                checked = rec.revision
            elif not is_approver(principal):
                raise PermissionDenied(f"endpoint.production: lifting production from endpoints/{rec.name} "
                                       f"needs role approver; {principal.subject} has "
                                       f"{sorted(principal.roles) or 'none'}")
        return await asyncio.to_thread(
            self.endpoints.update, rec.name, description=description if "description" in paths else None,
            production=production if "production" in paths else None, checked_revision=checked)

    async def delete_endpoint(self, name: str, principal: Principal) -> None:
        current_resource.set(f"endpoints/{name}")
        await asyncio.to_thread(self.endpoints.delete, name, production_allowed=is_approver(principal))
        await self.engine.sync()

    async def set_policy(self, endpoint: str, policy: TrafficPolicy, expected_revision: int, reason: str,
                         principal: Principal) -> EndpointRecord:
        current_resource.set(f"endpoints/{endpoint}")
        current = await asyncio.to_thread(self.endpoints.get, endpoint)  # NOT_FOUND before any loading
        validate_policy(policy)  # before the registry is asked anything
        resolved = await self._resolve_policy(policy, "policy")
        if current.production:
            await self._require_approved(current.name, resolved, field="policy")
        await self._preload(resolved)  # blue/green: the new versions are warm before the switch
        rec = await asyncio.to_thread(self.endpoints.set_policy, endpoint, resolved, principal.subject,
                                      expected_revision=expected_revision, reason=reason,
                                      approved=current.production)
        await self.engine.publish(rec.name, rec.revision)
        return rec

    async def rollback(self, endpoint: str, expected_revision: int, principal: Principal) -> EndpointRecord:
        current_resource.set(f"endpoints/{endpoint}")
        current = await asyncio.to_thread(self.endpoints.get, endpoint)
        expected = expected_revision or current.revision
        if current.production and expected == current.revision > 1:
            # The policy it would restore must route to approved versions too (a stale
            # expected_revision is ABORTED by the store without restoring anything).
            previous = await asyncio.to_thread(self.endpoints.policy_at, current.name, current.revision - 1)
            await self._require_approved(current.name, previous,
                                         source=f"the policy of revision {current.revision - 1}")
        rec = await asyncio.to_thread(self.endpoints.rollback, endpoint, principal.subject,
                                      expected_revision=expected, approved=current.production)
        await self.engine.publish(rec.name, rec.revision)
        return rec

    async def endpoint_stats(self, endpoint: str) -> tuple[int, list[TargetStats]]:
        """The current revision and its targets' figures, this process's reported first."""
        rec = await asyncio.to_thread(self.endpoints.get, endpoint)
        await self.engine.report()
        return rec.revision, await asyncio.to_thread(self.engine.endpoint_stats, rec.name, rec.revision)

    async def _resolve_policy(self, policy: TrafficPolicy, field: str) -> TrafficPolicy:
        """Aliases and missing versions -> concrete versions, so every process routes alike.
        The callers run validate_policy first (names, versions, weights); a stored policy may keep
        both a version and the alias it came from, so only the input is refused both here."""
        resolved = {}
        for kind in ("targets", "shadows"):
            targets = []
            for i, tg in enumerate(getattr(policy, kind)):
                if tg.version and tg.alias:
                    raise InvalidArgument(f"{field}.{kind}[{i}].alias", "give a version or an alias, not both")
                ref = await self.store.resolve(tg.model, tg.version, tg.alias)
                targets.append(dataclasses.replace(tg, version=ref.version))
            resolved[kind] = tuple(targets)
        return dataclasses.replace(policy, **resolved)

    async def _require_approved(self, endpoint: str, policy: TrafficPolicy, *, field: str = "",
                                source: str = "") -> None:
        """A production endpoint's policy: every target approved in the registry (governance.py)."""
        await require_approved(policy, self.store.approved_versions, endpoint=endpoint, field=field, source=source)

    async def _preload(self, policy: TrafficPolicy) -> None:
        for tg in (*policy.targets, *policy.shadows):
            await self.store.load(ModelRef(tg.model, tg.version))


def _known_outputs(known: Sequence[str], names: Sequence[str], field: Callable[[int, str], str]) -> None:
    """INVALID_ARGUMENT naming the first of `names` the model does not output."""
    have = set(known)
    for i, n in enumerate(names):
        if n not in have:
            raise InvalidArgument(field(i, n), f"unknown output {quote(n)}; outputs are {sorted(have)}")


def _model_order(outputs: list, names: Sequence[str]) -> list:
    """The outputs named in `names` (Predict's output_names, checked), in the model's order."""
    wanted = set(names)
    return [(n, a) for n, a in outputs if n in wanted]


def _requested_order(outputs: list, names: Sequence[str]) -> list:
    """The outputs named in `names` (V2's outputs, checked), in that order."""
    known = dict(outputs)
    return [(n, known[n]) for n in names]
