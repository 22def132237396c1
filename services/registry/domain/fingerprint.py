"""A stable digest of a JSON-able value. It binds a page token to its query (paging.py) and a
request id to its payload (idempotency.py, stored in idempotency_keys.request_hash, so a change
here would make every stored request id read as reused for a different request)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
