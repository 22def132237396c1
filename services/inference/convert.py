"""strata.inference.v1 messages <-> the inference domain's plain values, for the servicer
(server.py). Tensors and rows are codec.py's; the V2 protocol's messages are converted in v2.py."""

from __future__ import annotations

from strata.common.v1 import types_pb2
from strata.inference.v1 import inference_pb2 as pb

from services.common.convert import timestamp_pb
from services.common.errors import InvalidArgument
from services.common.telemetry import request_id_var
from services.inference import codec
from services.inference.dataplane import PredictRequest
from services.inference.endpoints import EndpointRecord, RevisionRecord
from services.inference.entities import CanaryLimits, PolicyBatching, Target, TargetStats, TrafficPolicy
from services.inference.model_store import LoadedModel, ModelState, ModelStatus
from services.inference.routing import Result
from services.inference.runtime import ModelRuntime, TensorInfo


# -- policies --------------------------------------------------------------------------------------
def _target(t: pb.Target) -> Target:
    return Target(t.model, t.version, t.alias, t.weight)


def policy_from_pb(p: pb.TrafficPolicy) -> TrafficPolicy:
    c, b = p.canary, p.batching
    return TrafficPolicy(
        targets=tuple(_target(t) for t in p.targets), shadows=tuple(_target(t) for t in p.shadows), sticky=p.sticky,
        canary=CanaryLimits(c.target_index, c.max_error_rate, c.max_p99_ms, c.min_requests)
        if p.HasField("canary") else None,
        batching=PolicyBatching(b.max_batch_size, b.max_queue_delay_us, b.max_queue_size)
        if p.HasField("batching") else None)


def _target_pb(t: Target) -> pb.Target:
    return pb.Target(model=t.model, version=t.version, alias=t.alias, weight=t.weight)


def policy_pb(p: TrafficPolicy) -> pb.TrafficPolicy:
    out = pb.TrafficPolicy(targets=[_target_pb(t) for t in p.targets], shadows=[_target_pb(t) for t in p.shadows],
                           sticky=p.sticky)
    if (c := p.canary) is not None:  # set, even when every field is 0: the policy says it was given
        out.canary.SetInParent()
        out.canary.MergeFrom(pb.CanaryLimits(target_index=c.target_index, max_error_rate=c.max_error_rate,
                                             max_p99_ms=c.max_p99_ms, min_requests=c.min_requests))
    if (b := p.batching) is not None:
        out.batching.SetInParent()
        out.batching.MergeFrom(pb.BatchingConfig(max_batch_size=b.max_batch_size,
                                                 max_queue_delay_us=b.max_queue_delay_us,
                                                 max_queue_size=b.max_queue_size))
    return out


# -- endpoints --------------------------------------------------------------------------------------
def endpoint_pb(e: EndpointRecord) -> pb.Endpoint:
    return pb.Endpoint(name=e.name, description=e.description, revision=e.revision, policy=policy_pb(e.policy),
                       created_by=e.created_by, create_time=timestamp_pb(e.create_time),
                       update_time=timestamp_pb(e.update_time), production=e.production)


def revision_pb(r: RevisionRecord) -> pb.PolicyRevision:
    return pb.PolicyRevision(revision=r.revision, policy=policy_pb(r.policy), created_by=r.created_by,
                             create_time=timestamp_pb(r.create_time), reason=r.reason)


def target_stats_pb(s: TargetStats) -> pb.TargetStats:
    return pb.TargetStats(model=s.model, version=s.version, shadow=s.shadow, requests=s.requests, errors=s.errors,
                          p99_ms=s.p99_ms)


# -- models -----------------------------------------------------------------------------------------
def _signature(rt: ModelRuntime) -> types_pb2.ModelSignature:
    def spec(i: TensorInfo) -> types_pb2.TensorSpec:
        return types_pb2.TensorSpec(name=i.name, dtype=codec.NUMPY_TO_STRATA.get(i.dtype, 0), shape=list(i.shape))
    return types_pb2.ModelSignature(inputs=[spec(i) for i in rt.inputs], outputs=[spec(o) for o in rt.outputs],
                                    allow_nan=rt.allow_nan)


def loaded_pb(m: LoadedModel) -> pb.LoadedModel:
    return pb.LoadedModel(model=m.ref.model, version=m.ref.version, state=ModelState.READY.value,
                          provider=m.runtime.provider, memory_bytes=m.runtime.memory_bytes,
                          signature=_signature(m.runtime), sha256=m.sha256)


def status_pb(s: ModelStatus) -> pb.LoadedModel:
    if s.loaded is not None:
        return loaded_pb(s.loaded)
    return pb.LoadedModel(model=s.model, version=s.version, state=s.state.value, reason=s.reason)


# -- predictions --------------------------------------------------------------------------------------
def predict_request(request: pb.PredictRequest) -> tuple[PredictRequest, bool]:
    """The plain request (inputs by reference), and whether it used raw bytes (the reply mirrors it)."""
    tensors, rows, entities = request.inputs, request.rows, request.entities
    given = [name for name, v in (("inputs", tensors), ("rows", rows), ("entities", entities)) if v]
    if len(given) > 1:
        raise InvalidArgument(given[1], f"give one of inputs, rows and entities, not {' and '.join(given)}")
    if not given:
        raise InvalidArgument("inputs", "no inputs: give inputs (tensors), rows, or entities (keys)")
    if entities:
        return PredictRequest(request.endpoint, (), (), request.routing_key, request.output_names,
                              request.request_id or request_id_var.get(), codec.plain_rows(entities)), False
    if rows:
        return PredictRequest(request.endpoint, (), codec.plain_rows(rows), request.routing_key,
                              request.output_names, request.request_id or request_id_var.get()), False
    inputs, raw_used = codec.input_tensors(tensors)
    return PredictRequest(request.endpoint, inputs, (), request.routing_key, request.output_names,
                          request.request_id or request_id_var.get()), raw_used


def predict_response(request: pb.PredictRequest, plain: PredictRequest, result: Result,
                     raw_used: bool) -> pb.PredictResponse:
    resp = pb.PredictResponse(endpoint=request.endpoint, model=result.ref.model, version=result.ref.version,
                              policy_revision=result.revision, request_id=plain.request_id)
    if plain.rows or plain.entities:
        resp.rows.extend(codec.to_rows(result.outputs))
    else:
        to = codec.to_raw_tensor if raw_used else codec.to_value_tensor
        resp.outputs.extend(to(n, a) for n, a in result.outputs)
    return resp
