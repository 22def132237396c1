"""policies as JSON

Revision ID: 0005
Revises: 0004
Create Date: 2027-02-01 10:00:00

policy_revisions.policy held a serialized strata.inference.v1.TrafficPolicy; it now holds the
policy as JSON, written and read by the inference domain (services/inference/entities.py), which
no longer loads generated code. Every row is converted (and back on downgrade).

The request ids of CreateEndpoint digest a payload that held the policy's protobuf bytes; it now
holds the same JSON dict. A key is re-digested when its first request can be rebuilt from what
is stored (revision 1's policy with the versions the request left to an alias or to "newest"
taken out, the endpoint's description and production flag) and matches the old digest; a key
that cannot be (the description changed since) keeps its digest, and a retry with its id is
refused as a different request, as 0004 did for ids it could not digest.

The layout below is frozen here on purpose: it must stay what entities.policy_to_dict writes.
"""

import itertools
import json

import sqlalchemy as sa
from alembic import op
from strata.inference.v1 import inference_pb2 as pb

from services.common.fingerprint import fingerprint

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_revisions = sa.table("policy_revisions", sa.column("endpoint", sa.String), sa.column("revision", sa.BigInteger),
                      sa.column("policy", sa.LargeBinary), sa.column("policy_json", sa.Text))
_keys = sa.table("idempotency_keys", sa.column("principal", sa.String), sa.column("method", sa.String),
                 sa.column("request_id", sa.String), sa.column("request_hash", sa.String))
_MAX_CANDIDATES = 4096


def _target(t: pb.Target) -> dict:
    return {"model": t.model, "version": t.version, "alias": t.alias, "weight": t.weight}


def _to_dict(p: pb.TrafficPolicy) -> dict:
    c, b = p.canary, p.batching
    return {
        "targets": [_target(t) for t in p.targets],
        "shadows": [_target(t) for t in p.shadows],
        "sticky": p.sticky,
        "canary": {"target_index": c.target_index, "max_error_rate": c.max_error_rate, "max_p99_ms": c.max_p99_ms,
                   "min_requests": c.min_requests} if p.HasField("canary") else None,
        "batching": {"max_batch_size": b.max_batch_size, "max_queue_delay_us": b.max_queue_delay_us,
                     "max_queue_size": b.max_queue_size} if p.HasField("batching") else None,
    }


def _from_dict(d: dict) -> pb.TrafficPolicy:
    p = pb.TrafficPolicy(targets=[pb.Target(**t) for t in d["targets"]],
                         shadows=[pb.Target(**t) for t in d["shadows"]], sticky=d["sticky"])
    if d["canary"] is not None:
        p.canary.CopyFrom(pb.CanaryLimits(**d["canary"]))
    if d["batching"] is not None:
        p.batching.CopyFrom(pb.BatchingConfig(**d["batching"]))
    return p


def _to_json(p: pb.TrafficPolicy) -> str:
    return json.dumps(_to_dict(p), sort_keys=True, separators=(",", ":"))


def _old_payload(name: str, description: str, production: bool, p: pb.TrafficPolicy) -> dict:
    return {"name": name, "description": description, "production": production,
            "policy": p.SerializeToString(deterministic=True).hex()}


def _new_payload(name: str, description: str, production: bool, p: pb.TrafficPolicy) -> dict:
    return {"name": name, "description": description, "production": production, "policy": _to_dict(p)}


def _requests(stored: pb.TrafficPolicy):  # noqa: ANN202
    """The CreateEndpoint policies that could have been stored as `stored`: a target with an alias
    came with version 0; one without came with its version or with 0 (the newest)."""
    targets = [*stored.targets, *stored.shadows]
    open_ = [i for i, t in enumerate(targets) if not t.alias and t.version]
    if 2 ** len(open_) > _MAX_CANDIDATES:
        open_ = []
    for zeroed in itertools.product((False, True), repeat=len(open_)):
        p = pb.TrafficPolicy()
        p.CopyFrom(stored)
        for i, t in enumerate([*p.targets, *p.shadows]):
            if t.alias or (i in open_ and zeroed[open_.index(i)]):
                t.version = 0
        yield p


def _redigest(conn: sa.Connection, first_policy: dict[str, pb.TrafficPolicy], old, new) -> None:  # noqa: ANN001
    rows = conn.execute(sa.text(
        "SELECT k.principal, k.request_id, k.request_hash, e.name, e.description, e.production "
        "FROM idempotency_keys k JOIN endpoints e ON e.name = k.resource "
        "WHERE k.method = 'CreateEndpoint' AND k.request_hash != ''")).all()
    for r in rows:
        stored = first_policy.get(r.name)
        if stored is None:
            continue
        for p, production in itertools.product(_requests(stored), (bool(r.production), not r.production)):
            if fingerprint(old(r.name, r.description, production, p)) == r.request_hash:
                conn.execute(_keys.update().where(
                    _keys.c.principal == r.principal, _keys.c.method == "CreateEndpoint",
                    _keys.c.request_id == r.request_id).values(
                    request_hash=fingerprint(new(r.name, r.description, production, p))))
                break


def upgrade() -> None:
    op.add_column("policy_revisions", sa.Column("policy_json", sa.Text(), nullable=True))
    conn = op.get_bind()
    first: dict[str, pb.TrafficPolicy] = {}
    for r in conn.execute(sa.select(_revisions.c.endpoint, _revisions.c.revision, _revisions.c.policy)).all():
        p = pb.TrafficPolicy.FromString(bytes(r.policy))
        if r.revision == 1:
            first[r.endpoint] = p
        conn.execute(_revisions.update().where(_revisions.c.endpoint == r.endpoint,
                                               _revisions.c.revision == r.revision).values(policy_json=_to_json(p)))
    _redigest(conn, first, _old_payload, _new_payload)
    with op.batch_alter_table("policy_revisions") as batch:
        batch.drop_column("policy")
        batch.alter_column("policy_json", new_column_name="policy", existing_type=sa.Text(), nullable=False)


def downgrade() -> None:
    op.add_column("policy_revisions", sa.Column("policy_pb", sa.LargeBinary(), nullable=True))
    conn = op.get_bind()
    text = sa.table("policy_revisions", sa.column("endpoint", sa.String), sa.column("revision", sa.BigInteger),
                    sa.column("policy", sa.Text), sa.column("policy_pb", sa.LargeBinary))
    first: dict[str, pb.TrafficPolicy] = {}
    for r in conn.execute(sa.select(text.c.endpoint, text.c.revision, text.c.policy)).all():
        p = _from_dict(json.loads(r.policy))
        if r.revision == 1:
            first[r.endpoint] = p
        conn.execute(text.update().where(text.c.endpoint == r.endpoint, text.c.revision == r.revision).values(
            policy_pb=p.SerializeToString(deterministic=True)))
    _redigest(conn, first, _new_payload, _old_payload)
    with op.batch_alter_table("policy_revisions") as batch:
        batch.drop_column("policy")
        batch.alter_column("policy_pb", new_column_name="policy", existing_type=sa.LargeBinary(), nullable=False)
