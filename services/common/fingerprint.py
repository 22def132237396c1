"""A stable digest of a request's payload or a list's query. It binds a page token to the query
that produced it (paging.py) and a request id to the payload of its first call (idempotency.py).

The digest is stored (idempotency_keys.request_hash, training_sets.request_hash), so it must
never change for a given value: a change would make every stored request id read as reused for
a different request."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(obj: Any) -> str:
    """sha256 hex of `obj`: bytes as they are (a deterministically serialized message), anything
    else as canonical JSON (keys sorted; values JSON does not know as their str())."""
    if isinstance(obj, bytes | bytearray):
        return hashlib.sha256(obj).hexdigest()
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
