"""Typed settings from STRATA_* environment variables, one object per service.

Shared knobs live in CommonSettings (STRATA_HOME, STRATA_AUTH, STRATA_JWT_*, STRATA_TLS_*...).
Per-service knobs use the service's own prefix (STRATA_REGISTRY_PORT, ...): see
`ServiceSettings.for_service`. Where things listen and where clients find them (host, port,
metrics port, address) is read by the functions at the end, which the services, `strata up`,
the CLI and the demo all use; TLS (both sides) is `TLSSettings`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORTS = {"registry": 50051, "features": 50052, "training": 50053, "inference": 50054, "monitoring": 50055,
                 "gateway": 8080}
GATEWAY_ADMIN_PORT = 9901
#: Where a local platform listens unless told otherwise (STRATA_HOST, STRATA_<NAME>_HOST).
DEFAULT_HOST = "127.0.0.1"
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")

log = logging.getLogger("strata.settings")


class TLSSettings(BaseSettings):
    """STRATA_TLS_*: both sides of every connection inside the platform.

    Server side (every gRPC listener): STRATA_TLS_CERT_FILE + STRATA_TLS_KEY_FILE turn TLS on;
    STRATA_TLS_CLIENT_CA_FILE also requires client certificates signed by that CA (mTLS).
    Client side (service to service, `strata up`'s health probes, Envoy's upstream clusters, the
    CLI, the demo; one channel factory in services/common/client.py): TLS is on when
    STRATA_TLS_CA_FILE or STRATA_TLS_CERT_FILE is set; the server is verified against
    STRATA_TLS_CA_FILE (default: the system's trusted roots), and STRATA_TLS_CLIENT_CERT_FILE +
    STRATA_TLS_CLIENT_KEY_FILE are the certificate presented for mTLS."""

    model_config = SettingsConfigDict(env_prefix="STRATA_", extra="ignore")

    tls_cert_file: Path | None = Field(None, description="this server's certificate (PEM, chain)")
    tls_key_file: Path | None = Field(None, description="this server's private key (PEM)")
    tls_client_ca_file: Path | None = Field(None, description="set to require client certificates (mTLS)")
    tls_ca_file: Path | None = Field(None, description="clients: the CA bundle that signs the services' certificates")
    tls_client_cert_file: Path | None = Field(None, description="clients: the certificate presented for mTLS")
    tls_client_key_file: Path | None = Field(None, description="clients: its private key")

    @model_validator(mode="after")
    def _pairs(self) -> TLSSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("STRATA_TLS_CERT_FILE and STRATA_TLS_KEY_FILE must be set together")
        if bool(self.tls_client_cert_file) != bool(self.tls_client_key_file):
            raise ValueError("STRATA_TLS_CLIENT_CERT_FILE and STRATA_TLS_CLIENT_KEY_FILE must be set together")
        return self

    @property
    def client_tls(self) -> bool:
        """Whether clients connect with TLS."""
        return bool(self.tls_ca_file or self.tls_cert_file)


class CommonSettings(TLSSettings):
    """Settings every service shares."""

    model_config = SettingsConfigDict(env_prefix="STRATA_", extra="ignore")

    home: Path = Field(Path(".strata"), description="embedded databases, artifacts, logs")
    auth: Literal["enabled", "disabled"] = "enabled"
    jwt_secret: SecretStr | None = Field(None, description="HS256 shared secret")
    jwt_jwks_url: str | None = Field(None, description="RS256/ES256 keys from a JWKS URL")
    jwt_jwks_file: Path | None = Field(None, description="RS256/ES256 keys from a JWKS file")
    jwt_issuer: str = "strata"
    jwt_audience: str = "strata-api"
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
        return self

    @property
    def artifact_store_url(self) -> str:
        return self.artifact_store or str((self.home / "artifacts").resolve())


class ServiceSettings(CommonSettings):
    """CommonSettings plus the per-service address, metrics port and database."""

    service: str = ""
    host: str = DEFAULT_HOST
    port: int = 0
    metrics_port: int = 0
    database_url: str = ""

    @classmethod
    def for_service(cls, name: str, **overrides: object) -> ServiceSettings:
        """Read STRATA_<NAME>_{HOST,PORT,METRICS_PORT,DATABASE_URL} with documented defaults."""
        values: dict[str, object] = {
            "service": name,
            "host": listen_host(name),
            "port": listen_port(name),
            "metrics_port": metrics_port(name),
            "database_url": os.environ.get(f"STRATA_{name.upper()}_DATABASE_URL", ""),
        }
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        if not settings.database_url:
            settings.database_url = f"sqlite:///{(settings.home / f'{name}.db').resolve()}"
        return settings


#: STRATA_<NAME>_* variables every service reads besides its own config class: where it listens
#: and where clients find it (the functions below), its database (ServiceSettings), its serving
#: processes (services/common/workers.py; ROLE and WORKER_ID are set by the parent).
SERVICE_KEYS = frozenset({"HOST", "PORT", "METRICS_PORT", "ADDR", "DATABASE_URL", "WORKERS", "ROLE", "WORKER_ID"})


class ServiceConfig(BaseSettings):
    """A service's own STRATA_<NAME>_* knobs, typed (subclasses declare the fields and set
    `model_config = SettingsConfigDict(env_prefix="STRATA_<NAME>_", extra="ignore")`). A bad value
    stops the service at start naming the variable, and so does a variable of the prefix that
    nothing reads: a misspelt knob (STRATA_FEATURES_ONLNE_STORE) must not silently leave the
    default in place."""

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> ServiceConfig:
        prefix = str(self.model_config.get("env_prefix", "")).upper()
        if not prefix.startswith("STRATA_") or prefix == "STRATA_":
            return self
        known = {f.upper() for f in type(self).model_fields} | SERVICE_KEYS
        unknown = sorted(k for k in os.environ if k.upper().startswith(prefix) and k.upper()[len(prefix):] not in known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; {prefix}* variables this service reads: "
                             + ", ".join(prefix + k for k in sorted(known)))
        return self


def _env(name: str, key: str, env: Mapping[str, str] | None) -> str | None:
    return (os.environ if env is None else env).get(f"STRATA_{name.upper()}_{key}")


def listen_host(name: str, env: Mapping[str, str] | None = None) -> str:
    """The address `name` ("registry", "gateway", ...) listens on: STRATA_<NAME>_HOST, else
    STRATA_HOST, else loopback (0.0.0.0 listens on every interface)."""
    e = os.environ if env is None else env
    return _env(name, "HOST", env) or e.get("STRATA_HOST") or DEFAULT_HOST


def listen_port(name: str, env: Mapping[str, str] | None = None) -> int:
    """STRATA_<NAME>_PORT, else the documented default (registry 50051, ..., gateway 8080)."""
    return int(_env(name, "PORT", env) or DEFAULT_PORTS[name])


def metrics_port(name: str, env: Mapping[str, str] | None = None) -> int:
    """STRATA_<NAME>_METRICS_PORT, else the gRPC port + 1000."""
    return int(_env(name, "METRICS_PORT", env) or listen_port(name, env) + 1000)


def admin_port(env: Mapping[str, str] | None = None) -> int:
    """Envoy's admin port (loopback only): STRATA_GATEWAY_ADMIN_PORT, default 9901."""
    return int(_env("gateway", "ADMIN_PORT", env) or GATEWAY_ADMIN_PORT)


def connect_host(host: str) -> str:
    """The address a client on this machine dials for a listener on `host`."""
    return "127.0.0.1" if host in _WILDCARD_HOSTS else host


def peer_address(name: str, env: Mapping[str, str] | None = None) -> str:
    """Where a service (or the gateway) listens, as host:port for clients: STRATA_<NAME>_ADDR,
    else this machine at the same STRATA_<NAME>_HOST / STRATA_<NAME>_PORT that `strata up` and
    the service itself use (default 127.0.0.1:<port>)."""
    return _env(name, "ADDR", env) or f"{connect_host(listen_host(name, env))}:{listen_port(name, env)}"
