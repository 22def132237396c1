"""The model registry's domain logic: plain Python over SQLAlchemy and the artifact store.
Nothing here knows about protobuf or gRPC; server.py translates.

- entities.py     Model, Version, Lineage, Upload, Promotion and their enum values
- checks.py       checks of request input (names, versions, aliases, tags, text)
- rows.py         lookups and rows -> entities (drafts hidden unless asked for)
- models.py, versions.py, aliases.py, uploads.py, promotions.py, recovery.py: one part each
- registry.py     `Registry`, the parts composed under the names the servicer calls

Pagination and request ids are the platform's (services/common/paging.py, idempotency.py);
the request ids live in this service's own `idempotency_keys` table.

The contracts: atomic registration in versions.py, crash safety of artifacts in uploads.py.
"""

from .checks import check_alias, check_name, check_tags, check_text, check_version
from .entities import (
    FRAMEWORKS, PROMOTION_APPROVED, PROMOTION_PENDING, PROMOTION_REJECTED, STAGE_ARCHIVED, STAGE_NONE,
    STAGE_PRODUCTION, STAGE_STAGING, STATUS_PENDING_UPLOAD, STATUS_READY, Lineage, Model, Promotion, Upload,
    Version,
)
from .registry import Registry, RegistryConfig
from .uploads import MAX_CHUNK_BYTES

__all__ = [
    "FRAMEWORKS",
    "MAX_CHUNK_BYTES",
    "PROMOTION_APPROVED",
    "PROMOTION_PENDING",
    "PROMOTION_REJECTED",
    "STAGE_ARCHIVED",
    "STAGE_NONE",
    "STAGE_PRODUCTION",
    "STAGE_STAGING",
    "STATUS_PENDING_UPLOAD",
    "STATUS_READY",
    "Lineage",
    "Model",
    "Promotion",
    "Registry",
    "RegistryConfig",
    "Upload",
    "Version",
    "check_alias",
    "check_name",
    "check_tags",
    "check_text",
    "check_version",
]
