"""gRPC servicer of strata.inference.v1.InferenceService (the V2 protocol is in v2.py).
Translation between protos and the engine only; the work is in routing.py and model_store.py
(batch jobs: batch_servicer.py)."""

from __future__ import annotations

import asyncio

from strata.common.v1 import types_pb2
from strata.inference.v1 import inference_pb2 as pb
from strata.inference.v1 import inference_pb2_grpc

from services.common.audit import current_resource
from services.common.auth import current_principal
from services.common.convert import timestamp_pb
from services.common.errors import InvalidArgument, NotFound, PermissionDenied, quote
from services.common.limits import check_version
from services.common.paging import PageRequest
from services.common.telemetry import request_id_var
from services.inference import codec
from services.inference.batch_jobs import BatchJobStore, BatchRunner
from services.inference.batch_servicer import BatchJobsServicer
from services.inference.endpoints import EndpointRecord, create_payload, validate_name, validate_policy
from services.inference.governance import is_approver, require_approved
from services.inference.model_store import LoadedModel, ModelRef
from services.inference.routing import Engine
from services.inference.runtime import ModelRuntime, TensorInfo



def endpoint_pb(e: EndpointRecord) -> pb.Endpoint:
    return pb.Endpoint(name=e.name, description=e.description, revision=e.revision, policy=e.policy,
                       created_by=e.created_by, create_time=timestamp_pb(e.create_time),
                       update_time=timestamp_pb(e.update_time), production=e.production)


def _loaded_key(m: pb.LoadedModel) -> tuple:
    return (m.model, m.version, m.state)


def _signature(rt: ModelRuntime) -> types_pb2.ModelSignature:
    def spec(i: TensorInfo) -> types_pb2.TensorSpec:
        return types_pb2.TensorSpec(name=i.name, dtype=codec.NUMPY_TO_STRATA.get(i.dtype, 0), shape=list(i.shape))
    return types_pb2.ModelSignature(inputs=[spec(i) for i in rt.inputs], outputs=[spec(o) for o in rt.outputs],
                                    allow_nan=rt.allow_nan)


def loaded_pb(m: LoadedModel) -> pb.LoadedModel:
    return pb.LoadedModel(model=m.ref.model, version=m.ref.version, state="READY", provider=m.runtime.provider,
                          memory_bytes=m.runtime.memory_bytes, signature=_signature(m.runtime), sha256=m.sha256)


class InferenceServicer(BatchJobsServicer, inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine, jobs: BatchJobStore, runner: BatchRunner) -> None:
        BatchJobsServicer.__init__(self, jobs, runner)
        self.engine = engine
        self.endpoints = engine.endpoints

    async def _resolve_policy(self, policy: pb.TrafficPolicy, field: str) -> pb.TrafficPolicy:
        """Aliases and missing versions -> concrete versions, so every process routes alike.
        The callers run validate_policy first (names, versions, weights); a stored policy may keep
        both a version and the alias it came from, so only the input is refused both here."""
        resolved = pb.TrafficPolicy()
        resolved.CopyFrom(policy)
        for kind in ("targets", "shadows"):
            for i, tg in enumerate(getattr(resolved, kind)):
                if tg.version and tg.alias:
                    raise InvalidArgument(f"{field}.{kind}[{i}].alias", "give a version or an alias, not both")
                ref = await self.engine.store.resolve(tg.model, tg.version, tg.alias)
                tg.version = ref.version
        return resolved

    async def _require_approved(self, endpoint: str, policy: pb.TrafficPolicy, *, field: str = "",
                                source: str = "") -> None:
        """A production endpoint's policy: every target approved in the registry (governance.py)."""
        await require_approved(policy, self.engine.store.approved_versions, endpoint=endpoint, field=field,
                               source=source)

    async def _preload(self, policy: pb.TrafficPolicy) -> None:
        for tg in (*policy.targets, *policy.shadows):
            await self.engine.store.load(ModelRef(tg.model, tg.version))

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:  # noqa: ANN001, N802
        rid = request.request_id or request_id_var.get()
        if request.inputs and request.rows:
            raise InvalidArgument("rows", "give inputs or rows, not both")
        if not request.inputs and not request.rows:
            raise InvalidArgument("inputs", "no inputs: give inputs (tensors) or rows")
        raw_used = False

        def decode(rt: ModelRuntime) -> dict:
            nonlocal raw_used
            specs = {i.name: i for i in rt.inputs}
            if request.rows:
                return codec.row_inputs(request.rows, specs)
            feeds, raw_used = codec.tensor_inputs(request.inputs, specs)
            return feeds

        result = await self.engine.predict(request.endpoint, decode, request.routing_key, rid)
        outputs = result.outputs
        if request.output_names:
            known = {n for n, _ in outputs}
            for i, n in enumerate(request.output_names):
                if n not in known:
                    raise InvalidArgument(f"output_names[{i}]", f"unknown output {quote(n)}; outputs are {sorted(known)}")
            outputs = [(n, a) for n, a in outputs if n in set(request.output_names)]
        resp = pb.PredictResponse(endpoint=request.endpoint, model=result.ref.model, version=result.ref.version,
                                  policy_revision=result.revision, request_id=rid)
        if request.rows:
            resp.rows.extend(codec.to_rows(outputs))
        else:
            to = codec.to_raw_tensor if raw_used else codec.to_value_tensor
            resp.outputs.extend(to(n, a) for n, a in outputs)
        return resp

    async def CreateEndpoint(self, request: pb.CreateEndpointRequest, context) -> pb.CreateEndpointResponse:  # noqa: ANN001, N802
        e = request.endpoint
        current_resource.set(f"endpoints/{e.name}")
        if not e.name:
            raise InvalidArgument("endpoint.name", "endpoint name is required")
        validate_name(e.name)
        validate_policy(e.policy, "endpoint.policy")  # before the registry is asked anything
        principal = current_principal.get().subject
        payload = create_payload(e.name, e.description, e.policy, e.production)  # as given: aliases unresolved
        first = await asyncio.to_thread(self.endpoints.created, principal, request.request_id, payload)
        if first is not None:
            return pb.CreateEndpointResponse(endpoint=endpoint_pb(first))  # a retry: the first result
        policy = await self._resolve_policy(e.policy, "endpoint.policy")
        if e.production:
            await self._require_approved(e.name, policy, field="endpoint.policy")
        await self._preload(policy)
        rec = await asyncio.to_thread(self.endpoints.create, e.name, e.description, policy, principal,
                                      request.request_id, production=e.production, payload=payload)
        await self.engine.publish(rec.name, rec.revision)
        return pb.CreateEndpointResponse(endpoint=endpoint_pb(rec))

    async def GetEndpoint(self, request: pb.GetEndpointRequest, context) -> pb.GetEndpointResponse:  # noqa: ANN001, N802
        rec = await asyncio.to_thread(self.endpoints.get, request.name)
        return pb.GetEndpointResponse(endpoint=endpoint_pb(rec))

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context) -> pb.ListEndpointsResponse:  # noqa: ANN001, N802
        recs, token = await asyncio.to_thread(self.endpoints.list, request.page_size, request.page_token)
        return pb.ListEndpointsResponse(endpoints=[endpoint_pb(r) for r in recs], next_page_token=token)

    async def UpdateEndpoint(self, request: pb.UpdateEndpointRequest, context) -> pb.UpdateEndpointResponse:  # noqa: ANN001, N802
        e = request.endpoint
        current_resource.set(f"endpoints/{e.name}")
        paths = set(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask", "name the fields to change: description, production")
        if unknown := paths - {"description", "production"}:
            hint = " (the policy changes through SetTrafficPolicy)" if "policy" in unknown else ""
            raise InvalidArgument("update_mask", f"paths must be among description, production; got "
                                  f"{sorted(p[:64] for p in unknown)[:5]}{hint}")
        rec = await asyncio.to_thread(self.endpoints.get, e.name)
        checked = 0
        if "production" in paths and e.production != rec.production:
            principal = current_principal.get()
            if e.production:  # the current policy must pass, as any later one will have to
                await self._require_approved(rec.name, rec.policy, source="its current policy")
                checked = rec.revision
            elif not is_approver(principal):
                raise PermissionDenied(f"endpoint.production: lifting production from endpoints/{rec.name} "
                                       f"needs role approver; {principal.subject} has "
                                       f"{sorted(principal.roles) or 'none'}")
        rec = await asyncio.to_thread(
            self.endpoints.update, rec.name, description=e.description if "description" in paths else None,
            production=e.production if "production" in paths else None, checked_revision=checked)
        return pb.UpdateEndpointResponse(endpoint=endpoint_pb(rec))

    async def DeleteEndpoint(self, request: pb.DeleteEndpointRequest, context) -> pb.DeleteEndpointResponse:  # noqa: ANN001, N802
        current_resource.set(f"endpoints/{request.name}")
        await asyncio.to_thread(self.endpoints.delete, request.name,
                                production_allowed=is_approver(current_principal.get()))
        await self.engine.sync()
        return pb.DeleteEndpointResponse()

    async def SetTrafficPolicy(self, request: pb.SetTrafficPolicyRequest, context) -> pb.SetTrafficPolicyResponse:  # noqa: ANN001, N802
        current_resource.set(f"endpoints/{request.endpoint}")
        current = await asyncio.to_thread(self.endpoints.get, request.endpoint)  # NOT_FOUND before any loading
        validate_policy(request.policy)  # before the registry is asked anything
        policy = await self._resolve_policy(request.policy, "policy")
        if current.production:
            await self._require_approved(current.name, policy, field="policy")
        await self._preload(policy)  # blue/green: the new versions are warm before the switch
        rec = await asyncio.to_thread(self.endpoints.set_policy, request.endpoint, policy,
                                      current_principal.get().subject, expected_revision=request.expected_revision,
                                      reason=request.reason, approved=current.production)
        await self.engine.publish(rec.name, rec.revision)
        return pb.SetTrafficPolicyResponse(endpoint=endpoint_pb(rec))

    async def RollbackTrafficPolicy(self, request: pb.RollbackTrafficPolicyRequest, context) -> pb.RollbackTrafficPolicyResponse:  # noqa: ANN001, N802, E501
        current_resource.set(f"endpoints/{request.endpoint}")
        current = await asyncio.to_thread(self.endpoints.get, request.endpoint)
        expected = request.expected_revision or current.revision
        if current.production and expected == current.revision > 1:
            # The policy it would restore must route to approved versions too (a stale
            # expected_revision is ABORTED by the store without restoring anything).
            previous = await asyncio.to_thread(self.endpoints.policy_at, current.name, current.revision - 1)
            await self._require_approved(current.name, previous,
                                         source=f"the policy of revision {current.revision - 1}")
        rec = await asyncio.to_thread(self.endpoints.rollback, request.endpoint, current_principal.get().subject,
                                      expected_revision=expected, approved=current.production)
        await self.engine.publish(rec.name, rec.revision)
        return pb.RollbackTrafficPolicyResponse(endpoint=endpoint_pb(rec))

    async def ListPolicyRevisions(self, request: pb.ListPolicyRevisionsRequest, context) -> pb.ListPolicyRevisionsResponse:  # noqa: ANN001, N802, E501
        revs, token = await asyncio.to_thread(self.endpoints.revisions, request.endpoint, request.page_size,
                                              request.page_token)
        return pb.ListPolicyRevisionsResponse(next_page_token=token, revisions=[
            pb.PolicyRevision(revision=r.revision, policy=r.policy, created_by=r.created_by,
                              create_time=timestamp_pb(r.create_time), reason=r.reason) for r in revs])

    async def GetEndpointStats(self, request: pb.GetEndpointStatsRequest, context) -> pb.GetEndpointStatsResponse:  # noqa: ANN001, N802
        rec = await asyncio.to_thread(self.endpoints.get, request.endpoint)
        await self.engine.report()
        stats = await asyncio.to_thread(self.engine.endpoint_stats, rec.name, rec.revision)
        return pb.GetEndpointStatsResponse(revision=rec.revision, targets=stats)

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:  # noqa: ANN001, N802
        if not request.model:
            raise InvalidArgument("model", "model name is required")
        check_version(request.version, "version", optional=True)
        ref = await self.engine.store.resolve(request.model, request.version, request.alias)
        current_resource.set(f"models/{ref.model}/versions/{ref.version}")
        return pb.LoadModelResponse(model=loaded_pb(await self.engine.store.load(ref)))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:  # noqa: ANN001, N802
        current_resource.set(f"models/{request.model}/versions/{request.version}")
        check_version(request.version, "version")
        if not await self.engine.store.unload(ModelRef(request.model, request.version)):
            raise NotFound(f"models/{quote(request.model, bare=True)}/versions/{request.version} is not loaded")
        return pb.UnloadModelResponse()

    async def ListLoadedModels(self, request: pb.ListLoadedModelsRequest, context) -> pb.ListLoadedModelsResponse:  # noqa: ANN001, N802
        # This process's models, paged like every list: by (model, version, state).
        page = PageRequest.parse("ListLoadedModels", request.page_size, request.page_token, key=list)
        models = [loaded_pb(m) for m in self.engine.store.loaded()]
        models += [pb.LoadedModel(model=r.model, version=r.version, state="LOADING")
                   for r in self.engine.store.loading()]
        models += [pb.LoadedModel(model=r.model, version=r.version, state="FAILED", reason=why)
                   for r, why in self.engine.store.failures.items()]
        models.sort(key=_loaded_key)
        if page.after is not None:
            after = tuple(page.after)
            if [type(v) for v in after] != [str, int, str]:
                raise InvalidArgument("page_token", "is not a token returned by this list with these filters")
            models = [m for m in models if _loaded_key(m) > after]
        models, token = page.cut(models, lambda m: list(_loaded_key(m)))
        return pb.ListLoadedModelsResponse(models=models, next_page_token=token)
