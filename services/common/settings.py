"""Typed settings from STRATA_* environment variables, one object per service.

Shared knobs live in CommonSettings (STRATA_HOME, STRATA_AUTH, STRATA_JWT_*, STRATA_TLS_*...).
Per-service knobs use the service's own prefix (STRATA_REGISTRY_PORT, ...): see
`ServiceSettings.for_service`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORTS = {"registry": 50051, "features": 50052, "training": 50053, "inference": 50054, "monitoring": 50055}

log = logging.getLogger("strata.settings")


class CommonSettings(BaseSettings):
    """Settings every service shares."""

    model_config = SettingsConfigDict(env_prefix="STRATA_", extra="ignore")

    home: Path = Field(Path(".strata"), description="embedded databases, artifacts, logs")
    auth: Literal["enabled", "disabled"] = "enabled"
    jwt_secret: SecretStr | None = Field(None, description="HS256 shared secret")
    jwt_jwks_url: str | None = Field(None, description="RS256/ES256 keys from a JWKS URL")
    jwt_jwks_file: Path | None = Field(None, description="RS256/ES256 keys from a JWKS file")
    jwt_issuer: str = "strata"
    jwt_audience: str = "strata-api"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = Field(None, description="set to require client certificates (mTLS)")
    max_message_bytes: int = 32 << 20
    grace_seconds: float = Field(15.0, description="SIGTERM: how long in-flight calls may finish")
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    tracing: Literal["none", "console", "otlp"] = "none"
    otlp_endpoint: str = "127.0.0.1:4317"
    artifact_store: str | None = Field(None, description="local path, file:// or s3://bucket/prefix?endpoint=")

    @model_validator(mode="after")
    def _auth_needs_keys(self) -> CommonSettings:
        if self.auth == "enabled" and not (self.jwt_secret or self.jwt_jwks_url or self.jwt_jwks_file):
            raise ValueError(
                "STRATA_AUTH is enabled but no key is configured: set STRATA_JWT_SECRET (HS256), "
                "STRATA_JWT_JWKS_URL or STRATA_JWT_JWKS_FILE, or STRATA_AUTH=disabled for local development"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("STRATA_TLS_CERT_FILE and STRATA_TLS_KEY_FILE must be set together")
        return self

    @property
    def artifact_store_url(self) -> str:
        return self.artifact_store or str((self.home / "artifacts").resolve())


class ServiceSettings(CommonSettings):
    """CommonSettings plus the per-service address, metrics port and database."""

    service: str = ""
    host: str = "0.0.0.0"
    port: int = 0
    metrics_port: int = 0
    database_url: str = ""

    @classmethod
    def for_service(cls, name: str, **overrides: object) -> ServiceSettings:
        """Read STRATA_<NAME>_{HOST,PORT,METRICS_PORT,DATABASE_URL} with documented defaults."""
        prefix = f"STRATA_{name.upper()}_"
        env = os.environ
        port = int(env.get(prefix + "PORT", DEFAULT_PORTS[name]))
        values: dict[str, object] = {
            "service": name,
            "host": env.get(prefix + "HOST", "0.0.0.0"),
            "port": port,
            "metrics_port": int(env.get(prefix + "METRICS_PORT", port + 1000)),
            "database_url": env.get(prefix + "DATABASE_URL", ""),
        }
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        if not settings.database_url:
            settings.database_url = f"sqlite:///{(settings.home / f'{name}.db').resolve()}"
        return settings


def peer_address(name: str) -> str:
    """Where another service listens: STRATA_<NAME>_ADDR, default 127.0.0.1:<port>."""
    return os.environ.get(f"STRATA_{name.upper()}_ADDR", f"127.0.0.1:{DEFAULT_PORTS[name]}")
