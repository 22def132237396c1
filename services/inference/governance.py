"""Governance of what production endpoints serve.

The registry's two-person rule (RequestPromotion by one principal, ApprovePromotion by another
with the approver role) would mean little if any developer could point an endpoint at any
version. An endpoint marked `production` therefore routes returned traffic only to versions that
went through that approval; shadow targets are exempt (their results are logged, never returned).

"Went through approval" is asked of the registry, not of the stage or an alias: a version with an
APPROVED promotion stays approved after a newer one replaces it (stage ARCHIVED), so a rollback
to it is allowed, while a stage set by hand or an alias moved outside the workflow proves nothing.

Who may do what: any developer may create a production endpoint or mark one production (it only
adds a constraint; the current policy must pass the check); lifting the flag or deleting a
production endpoint needs the approver role, since either would walk around the rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from services.common.auth import Principal
from services.common.errors import FailedPrecondition
from services.inference.entities import TrafficPolicy

ApprovedVersions = Callable[[str], Awaitable[set[int]]]

# The roles that rank at or above approver in the platform's role table (services/common/policy.py,
# built on the generated role enum, which the domain does not load); tests/inference/test_governance.py
# checks that the two agree.
APPROVER_ROLES = frozenset({"approver", "admin"})


async def require_approved(policy: TrafficPolicy, approved_versions: ApprovedVersions, *, endpoint: str,
                           field: str = "", source: str = "") -> None:
    """FAILED_PRECONDITION naming the first target of `policy` whose version was never approved.
    The message names the target by the request field the policy came in (`field`, e.g.
    "endpoint.policy" -> "endpoint.policy.targets[1]") or, for a stored policy, by `source`
    ("the policy of revision 3" -> "targets[1] of the policy of revision 3"). The registry is
    asked once per model; unreachable, the call is UNAVAILABLE (the check never passes by default)."""
    approved: dict[str, set[int]] = {}
    for i, tg in enumerate(policy.targets):
        if tg.model not in approved:
            approved[tg.model] = await approved_versions(tg.model)
        if tg.version not in approved[tg.model]:
            where = f"{field}.targets[{i}]" if field else f"targets[{i}] of {source}"
            raise FailedPrecondition(
                f"endpoints/{endpoint} is a production endpoint: {where} routes to "
                f"models/{tg.model}/versions/{tg.version}, which was never approved (RequestPromotion, then "
                "ApprovePromotion by another approver); route to an approved version, or give it as a shadow")


def drain_canary(policy: TrafficPolicy) -> TrafficPolicy | None:
    """The policy without its canary target and limits (the rest unchanged), or None when no
    other target would take traffic."""
    if policy.canary is None:
        return None
    i = policy.canary.target_index
    drained = dataclasses.replace(policy, targets=policy.targets[:i] + policy.targets[i + 1:], canary=None)
    if sum(t.weight for t in drained.targets) <= 0:
        return None
    return drained


def is_approver(principal: Principal) -> bool:
    return not APPROVER_ROLES.isdisjoint(principal.roles)
