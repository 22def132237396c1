"""Wiring of the feature service: settings -> database (migrated) -> definitions -> online store
(STRATA_FEATURES_ONLINE_STORE: a SQLite file by default, redis://host:port/db in production) ->
data plane -> gRPC servicer -> the shared server bootstrap."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from strata.features.v1 import features_pb2, features_pb2_grpc

from services.common.audit import AuditLog
from services.common.db import Database
from services.common.server import Service
from services.common.settings import ServiceConfig, ServiceSettings
from services.common.workers import shares_port
from services.features import tables
from services.features.dataplane import FeatureDataPlane
from services.features.definitions import Definitions
from services.features.files import OfflineFiles
from services.features.historical import HistoricalRetrieval
from services.features.materialize import Materializer
from services.features.offline_append import Compactor, make_appender
from services.features.online import open_online_store
from services.features.online_serving import DEFAULT_MAX_FUTURE_SKEW_SECONDS, OnlineFeatures, ViewCache
from services.features.servicer import FeatureServicer
from services.features.training_sets import TrainingSets

MIGRATIONS = Path(__file__).parent / "migrations"


class FeaturesConfig(ServiceConfig):
    """STRATA_FEATURES_* knobs beyond the common service settings, typed: a bad value, or a
    STRATA_FEATURES_ variable nothing reads, stops the service at start naming the variable."""

    model_config = SettingsConfigDict(env_prefix="STRATA_FEATURES_", extra="ignore")

    online_store: str = Field("", description="a SQLite file (default STRATA_HOME/features-online.db) "
                                              "or redis://host:port/db")
    offline_paths: str = Field("", description="os.pathsep-separated local directories outside the "
                                               "artifact store that sources and entity tables may name")
    offline_cache_gb: float = Field(20.0, gt=0, allow_inf_nan=False,
                                    description="local copies of S3 sources, least recently used evicted beyond")
    compact_after: int = Field(64, ge=1, description="pushed files per source directory before a compaction")
    max_future_skew_seconds: float = Field(
        DEFAULT_MAX_FUTURE_SKEW_SECONDS, ge=0, allow_inf_nan=False,
        description="how far ahead of this service's clock a pushed event time or materialization end may be")


def build_service(settings: ServiceSettings | None = None, config: FeaturesConfig | None = None) -> Service:
    settings = settings or ServiceSettings.for_service("features")
    config = config or FeaturesConfig()
    db = Database(settings.database_url)
    db.migrate(MIGRATIONS)
    definitions = Definitions(db)
    settings.home.mkdir(parents=True, exist_ok=True)
    online_url = config.online_store or str((settings.home / "features-online.db").resolve())
    store = open_online_store(online_url)
    # Offline sources, entity tables and training sets: keys in the artifact store (a local
    # directory or S3), s3:// URIs, or absolute paths under STRATA_FEATURES_OFFLINE_PATHS (files.py).
    files = OfflineFiles(settings.artifact_store_url,
                         [p for p in config.offline_paths.split(os.pathsep) if p],
                         cache_dir=settings.home / "cache" / "offline",
                         cache_bytes=int(config.offline_cache_gb * (1 << 30)))
    materializer = Materializer(db, definitions, store, files,
                                max_future_skew_seconds=config.max_future_skew_seconds)
    compactor = Compactor(files, threshold=config.compact_after)
    online = OnlineFeatures(ViewCache(definitions), store, offline_append=make_appender(files, compactor),
                            max_future_skew_seconds=config.max_future_skew_seconds)
    historical = HistoricalRetrieval(definitions, files)
    plane = FeatureDataPlane(definitions, online, materializer, historical, TrainingSets(db, historical, files),
                             files)
    servicer = FeatureServicer(plane)
    return Service(
        settings=settings,
        descriptors=[features_pb2.DESCRIPTOR.services_by_name["FeatureService"]],
        register=lambda server: features_pb2_grpc.add_FeatureServiceServicer_to_server(servicer, server),
        audit_log=AuditLog(db, tables.audit_events),
        on_start=[plane.warm],
        on_stop=[store.close, db.dispose],
        reuse_port=shares_port("features"),
    )

