"""The inference domain's plain values: traffic policies and the per-target statistics of an
endpoint. Frozen and slotted: a policy is shared by every request its route serves.

A policy is stored as JSON (`policy_to_json`, `policy_from_json`): the endpoint store writes and
reads it, and the idempotency payload of CreateEndpoint digests the same dict, so the layout
below never changes for a given policy (a change would make stored request ids read as reused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Target:
    """One model version an endpoint routes to (or shadows). version 0 with an alias: the alias,
    resolved when the policy is set; a stored policy keeps the alias beside the version."""

    model: str
    version: int = 0
    alias: str = ""
    weight: int = 0


@dataclass(frozen=True, slots=True)
class CanaryLimits:
    """Automatic rollback of targets[target_index] when its error rate or p99 goes past a limit
    (0: no limit) after min_requests requests."""

    target_index: int = 0
    max_error_rate: float = 0.0
    max_p99_ms: float = 0.0
    min_requests: int = 0


@dataclass(frozen=True, slots=True)
class PolicyBatching:
    """Dynamic batching of an endpoint's models; 0 takes the service default."""

    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    max_queue_size: int = 0


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """How an endpoint's requests are routed. `canary` and `batching` are None when not given
    (an all-zero batching that was given is kept as given)."""

    targets: tuple[Target, ...] = ()
    shadows: tuple[Target, ...] = ()
    sticky: bool = False
    canary: CanaryLimits | None = None
    batching: PolicyBatching | None = None


@dataclass(frozen=True, slots=True)
class TargetStats:
    """One target's figures in an endpoint's current revision, summed over serving processes."""

    model: str
    version: int
    shadow: bool
    requests: int
    errors: int
    p99_ms: float


# -- the stored form -------------------------------------------------------------------------------
def _target_dict(t: Target) -> dict:
    return {"model": t.model, "version": t.version, "alias": t.alias, "weight": t.weight}


def policy_to_dict(p: TrafficPolicy) -> dict:
    """Every field, always (no defaults left out): the dict is digested for idempotency."""
    c, b = p.canary, p.batching
    return {
        "targets": [_target_dict(t) for t in p.targets],
        "shadows": [_target_dict(t) for t in p.shadows],
        "sticky": p.sticky,
        "canary": None if c is None else {"target_index": c.target_index, "max_error_rate": c.max_error_rate,
                                          "max_p99_ms": c.max_p99_ms, "min_requests": c.min_requests},
        "batching": None if b is None else {"max_batch_size": b.max_batch_size,
                                            "max_queue_delay_us": b.max_queue_delay_us,
                                            "max_queue_size": b.max_queue_size},
    }


def policy_from_dict(d: dict) -> TrafficPolicy:
    c, b = d.get("canary"), d.get("batching")
    return TrafficPolicy(
        targets=tuple(Target(**t) for t in d.get("targets", ())),
        shadows=tuple(Target(**t) for t in d.get("shadows", ())),
        sticky=bool(d.get("sticky", False)),
        canary=None if c is None else CanaryLimits(**c),
        batching=None if b is None else PolicyBatching(**b))


def policy_to_json(p: TrafficPolicy) -> str:
    # NaN and infinities (a max_p99_ms may be one) are written as Python's json writes them.
    return json.dumps(policy_to_dict(p), sort_keys=True, separators=(",", ":"))


def policy_from_json(text: str) -> TrafficPolicy:
    return policy_from_dict(json.loads(text))
