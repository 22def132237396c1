"""Wiring of the registry service: settings -> database (migrated) -> artifact store ->
domain -> servicer -> the shared server bootstrap."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from strata.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.artifacts import open_artifact_store
from services.common.audit import AuditLog
from services.common.db import Database
from services.common.server import Service
from services.common.settings import ServiceConfig, ServiceSettings
from services.registry import tables
from services.registry.domain import Registry, RegistryConfig
from services.registry.server import RegistryServicer

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("strata.registry")


class RegistrySettings(ServiceConfig):
    """STRATA_REGISTRY_* knobs beyond the common service settings, typed: a bad value, or a
    STRATA_REGISTRY_ variable nothing reads, stops the service at start naming the variable."""

    model_config = SettingsConfigDict(env_prefix="STRATA_REGISTRY_", extra="ignore")

    protected_aliases: str = Field("production,champion", description="comma-separated aliases that move "
                                                                       "only through an approved promotion")
    # One registry per database (the embedded default) can clean up at once; with replicas set
    # a settle time so a starting replica leaves the others' uploads in progress alone.
    recovery_settle_seconds: float = Field(0.0, ge=0, allow_inf_nan=False,
                                           description="uploads idle for less than this are left to other replicas")

    @property
    def domain(self) -> RegistryConfig:
        return RegistryConfig(protected_aliases=frozenset(
            a.strip() for a in self.protected_aliases.split(",") if a.strip()))


def build_registry(settings: ServiceSettings, config: RegistrySettings | None = None) -> Registry:
    db = Database(settings.database_url)
    db.migrate(MIGRATIONS)
    config = config or RegistrySettings()
    return Registry(db, open_artifact_store(settings.artifact_store_url), config.domain)


def build_service(settings: ServiceSettings | None = None, config: RegistrySettings | None = None) -> Service:
    settings = settings or ServiceSettings.for_service("registry")
    config = config or RegistrySettings()
    registry = build_registry(settings, config)
    counts = registry.recover(timedelta(seconds=config.recovery_settle_seconds))
    if any(counts.values()):
        log.warning("recovered after an interrupted run", extra={"fields": counts})
    audit = AuditLog(registry.db, tables.audit_events)
    servicer = RegistryServicer(registry, audit)
    return Service(
        settings=settings,
        descriptors=[registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]],
        register=lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server),
        audit_log=audit,
        on_stop=[registry.db.dispose],
    )
