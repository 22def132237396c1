"""The inference service's own settings (STRATA_INFERENCE_*), typed. Kept apart from the wiring
(app.py): reading them loads neither the V2 protocol's generated code nor the servicers."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.auth import service_token
from services.common.process_tuning import threads_per_process
from services.common.settings import ServiceConfig, ServiceSettings, peer_address
from services.inference.batching import BatchingConfig
from services.inference.endpoints import STATS_KEEP_REVISIONS


class InferenceConfig(ServiceConfig):
    """STRATA_INFERENCE_* knobs beyond the common service settings, typed: a bad value, or a
    STRATA_INFERENCE_ variable nothing reads, stops the service at start naming the variable."""

    model_config = SettingsConfigDict(env_prefix="STRATA_INFERENCE_", extra="ignore")

    intra_op_threads: int | None = Field(None, ge=1, description="ONNX Runtime threads per session "
                                                                  "(default: cores / serving processes)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    memory_budget_mb: float = Field(4096, gt=0, allow_inf_nan=False, description="models per process, LRU beyond")
    max_batch_size: int = Field(64, ge=1, description="dynamic batching default")
    max_queue_delay_us: int = Field(0, ge=0, description="dynamic batching default")
    max_queue_size: int = Field(1024, ge=1, description="dynamic batching default")
    inline_us: float = Field(1000, ge=0, allow_inf_nan=False,
                             description="models whose largest warm-up batch is faster run on the event loop")
    prediction_log: str = Field("", description="directory (default STRATA_HOME/inference/predictions) or disabled")
    poll_seconds: float = Field(0.2, gt=0, allow_inf_nan=False, description="how often policy revisions are read")
    registry_token: SecretStr | None = Field(None, description="the service's identity towards the registry and "
                                                                "the feature store (default: a viewer token minted "
                                                                "from STRATA_JWT_SECRET)")
    stats_keep_revisions: int = Field(STATS_KEEP_REVISIONS, ge=1, description="per endpoint, in the statistics table")
    stats_prune_seconds: float = Field(60.0, gt=0, allow_inf_nan=False, description="how often that table is pruned")
    batch_paths: str = Field("", description="os.pathsep-separated local directories batch jobs may read and "
                                             "write besides the artifact store")
    monitoring: str = Field("", description="where the prediction log goes: empty: files under "
                                            "STRATA_INFERENCE_PREDICTION_LOG; auto: the monitoring service at "
                                            "STRATA_MONITORING_ADDR (its default address otherwise); host:port: the "
                                            "monitoring service there")
    monitoring_token: SecretStr | None = Field(None, description="the service's identity towards monitoring "
                                                                  "(default: a developer token minted from "
                                                                  "STRATA_JWT_SECRET; ingestion needs that role)")
    monitoring_timeout_seconds: float = Field(10.0, gt=0, le=60, allow_inf_nan=False,
                                              description="deadline of one delivery to monitoring (shutdown "
                                                          "waits this long, plus 5 s, for the last one)")

    @field_validator("monitoring")
    @classmethod
    def _monitoring_target(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if value in ("", "auto") or (sep and host and port.isdigit()):
            return value
        raise ValueError("must be empty (local files), auto, or host:port of the monitoring service")

    # -- derived -------------------------------------------------------------------------------
    # services.common.workers imports the gRPC server (and so generated code): read when the
    # wiring asks, not when the settings are.
    @property
    def workers(self) -> int:
        from services.common.workers import worker_count

        return max(1, worker_count("inference"))

    @property
    def worker_id(self) -> str:
        from services.common.workers import worker_id

        return worker_id("inference")

    @property
    def threads(self) -> int:
        return self.intra_op_threads or threads_per_process(self.workers)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * (1 << 20))

    @property
    def batching(self) -> BatchingConfig:
        return BatchingConfig(max_batch_size=self.max_batch_size, max_queue_delay_us=self.max_queue_delay_us,
                              max_queue_size=self.max_queue_size)

    @property
    def local_batch_paths(self) -> tuple[str, ...]:
        return tuple(p for p in self.batch_paths.split(os.pathsep) if p)

    @property
    def monitoring_address(self) -> str | None:
        """Where the prediction log is sent; None: it is written to local files."""
        if not self.monitoring:
            return None
        return peer_address("monitoring") if self.monitoring == "auto" else self.monitoring

    def monitoring_credentials(self, settings: ServiceSettings) -> str | None:
        """The token inference presents to monitoring: STRATA_INFERENCE_MONITORING_TOKEN, else,
        with auth on and an HS256 secret, one minted for the service with the developer role
        (IngestPredictions' minimum)."""
        return service_token(settings, "strata-inference", ["developer"], self.monitoring_token)

    def registry_credentials(self, settings: ServiceSettings) -> str | None:
        """The token inference presents to the registry: STRATA_INFERENCE_REGISTRY_TOKEN, else, with
        auth on and an HS256 secret, a read-only one minted for the service."""
        return service_token(settings, "strata-inference", ["viewer"], self.registry_token)
