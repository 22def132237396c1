"""The registry as one object: the parts composed over one database and one artifact store,
under the method names the servicer calls."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from services.common.artifacts import ArtifactStore
from services.common.db import Database

from .aliases import Aliases
from .models import Models
from .promotions import Promotions
from .recovery import Recovery
from .uploads import Uploads
from .versions import Versions


@dataclass
class RegistryConfig:
    protected_aliases: frozenset[str] = frozenset({"production", "champion"})
    max_artifact_bytes: int = 20 << 30
    stale_upload_after: timedelta = timedelta(hours=24)


class Registry:
    """Each part holds no state but the upload hashers and locks (Uploads), so two Registry
    objects over one database behave as two replicas."""

    def __init__(self, db: Database, store: ArtifactStore, config: RegistryConfig | None = None) -> None:
        self.db = db
        self.store = store
        self.config = config or RegistryConfig()
        self.models = Models(db, store)
        self.versions = Versions(db, store)
        self.aliases = Aliases(db, store, self.config.protected_aliases)
        self.uploads = Uploads(db, store, self.config.max_artifact_bytes)
        self.promotions = Promotions(db, store)
        self.recovery = Recovery(db, store, self.uploads, self.config.stale_upload_after)

        self.create_model = self.models.create_model
        self.get_model = self.models.get_model
        self.list_models = self.models.list_models
        self.update_model = self.models.update_model
        self.delete_model = self.models.delete_model

        self.create_version = self.versions.create_version
        self.get_version = self.versions.get_version
        self.list_versions = self.versions.list_versions
        self.update_version = self.versions.update_version
        self.delete_version = self.versions.delete_version
        self.transition_stage = self.versions.transition_stage
        self.read_artifact = self.versions.read_artifact

        self.set_alias = self.aliases.set_alias
        self.delete_alias = self.aliases.delete_alias
        self.get_by_alias = self.aliases.get_by_alias

        self.begin_upload = self.uploads.begin_upload
        self.get_upload = self.uploads.get_upload
        self.append_chunk = self.uploads.append_chunk
        self.commit_upload = self.uploads.commit_upload
        self.abort_upload = self.uploads.abort_upload

        self.request_promotion = self.promotions.request_promotion
        self.decide_promotion = self.promotions.decide_promotion
        self.list_promotions = self.promotions.list_promotions

        self.recover = self.recovery.recover
