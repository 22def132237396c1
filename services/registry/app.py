"""Wiring of the registry service: settings -> database (migrated) -> artifact store ->
domain -> servicer -> the shared server bootstrap."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

from strata.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.artifacts import open_artifact_store
from services.common.audit import AuditLog
from services.common.db import Database
from services.common.server import Service
from services.common.settings import ServiceSettings
from services.registry import tables
from services.registry.core import Registry, RegistryConfig
from services.registry.server import RegistryServicer

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger("strata.registry")


def build_registry(settings: ServiceSettings) -> Registry:
    db = Database(settings.database_url)
    db.migrate(MIGRATIONS)
    protected = os.environ.get("STRATA_REGISTRY_PROTECTED_ALIASES", "production,champion")
    config = RegistryConfig(protected_aliases=frozenset(a.strip() for a in protected.split(",") if a.strip()))
    return Registry(db, open_artifact_store(settings.artifact_store_url), config)


def build_service(settings: ServiceSettings | None = None) -> Service:
    settings = settings or ServiceSettings.for_service("registry")
    registry = build_registry(settings)
    # One registry per database (the embedded default) can clean up at once; with replicas set
    # a settle time so a starting replica leaves the others' uploads in progress alone.
    settle = float(os.environ.get("STRATA_REGISTRY_RECOVERY_SETTLE_SECONDS", "0"))
    counts = registry.recover(timedelta(seconds=settle))
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
