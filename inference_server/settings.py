"""One settings object, read from the environment once at start-up and passed down."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The Standard Webhooks retry schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h.
STANDARD_WEBHOOK_DELAYS = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)


def default_home() -> Path:
    return Path.home() / ".inference-server"


class Settings(BaseSettings):
    """Every knob of the system. Names are the environment variables (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    environment: Literal["development", "production"] = "development"
    home: Path = Field(default_factory=default_home, validation_alias="INFERENCE_SERVER_HOME")

    # Logs: "text", "json", or "auto" (text on a terminal, JSON lines otherwise).
    log_format: Literal["text", "json", "auto"] = "auto"
    log_level: str = "INFO"

    # Where things live. Empty strings mean "the embedded default under home".
    database_url: str = ""
    broker_url: str = "amqp://guest:guest@localhost:5672//"
    storage_url: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    presign_expires_seconds: int = 3600
    models_file: Path | None = None
    model_cache_dir: Path | None = None
    # Bounded waits on PostgreSQL (seconds; 0 turns one off): see inference_server/db/timeouts.py.
    database_connect_timeout: float = 5.0
    database_statement_timeout: float = 30.0  # above the longest legitimate statement
    database_idle_in_transaction_timeout: float = 60.0
    database_dead_peer_timeout: float = 10.0  # TCP keepalives and tcp_user_timeout
    database_pool_timeout: float = 5.0
    # Bounded waits on S3-compatible storage.
    storage_connect_timeout: float = 5.0
    storage_read_timeout: float = 30.0
    storage_max_attempts: int = 4  # botocore attempts per request, the first included

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = ""  # where clients (the CLI) reach the API; default http://api_host:api_port
    rate_limit_per_minute: int = 0  # per tenant, unless the tenant has its own; 0 disables
    api_key_cache_seconds: float = Field(default=30.0, ge=0)  # a revoked key works this long at most
    auth_failures_per_minute: int = 0  # per client address, wrong API keys; 0 disables
    # Where both limits count: memory:// (per process) or redis://host:port/db (shared by replicas).
    rate_limit_storage_url: str = "memory://"
    rate_limit_key_prefix: str = Field(default="inference-server", min_length=1)
    # /docs and /openapi.json need an API key; unset: only when ENVIRONMENT=production.
    docs_require_key: bool | None = None
    # Serve /metrics on this port only (a listener of its own, for Prometheus); 0: on API_PORT.
    api_metrics_port: int = Field(default=0, ge=0, le=65535)
    api_metrics_host: str = "0.0.0.0"
    max_request_bytes: int = 30 * 1024 * 1024
    api_statement_timeout: float = 3.0  # the API's statements are short: a stuck database is a fast 503
    events_poll_interval: float = Field(default=0.5, gt=0)  # event streams' read without a NOTIFY
    stream_keepalive_seconds: float = Field(default=15.0, gt=0)  # SSE comment on an idle stream
    api_shutdown_grace: float = Field(default=5.0, ge=0)  # open streams get this long at a stop

    # Inputs.
    allow_private_networks: bool = False
    max_input_bytes: int = 20 * 1024 * 1024
    max_input_pixels: int = 16_000_000
    input_fetch_timeout: float = 15.0  # in all, retries included
    input_fetch_attempts: int = 3  # network errors and 5xx are tried again within the timeout
    # The safety of jobs whose request and tenant name none (docs/composition.md).
    safety_default: Literal["off", "flag", "block"] = "off"

    # Jobs and workers.
    job_max_attempts: int = 3
    progress_interval: float = 0.5  # seconds between progress writes per job (at most twice a second)
    cancel_poll_interval: float = 0.25
    consumer_timeout_ms: int = 4 * 3600 * 1000  # above the longest job of any family
    torch_threads: int = 0  # 0: torch's default; tests use 1
    engine_cache_bytes: int = 0  # pipeline cache budget; 0: device memory (CUDA) or half of RAM (CPU)
    engine_max_edit_pixels: int = 0  # cap on the working area of edit pipelines; 0: the pipeline's own
    device: str = "cpu"  # set by `worker --device`; "cuda" after the launcher pins one GPU
    worker_max_jobs_per_child: int = 0  # recycle the child after N jobs (0: never)
    # Denoised pipeline calls (a job, or a batch's members together) a worker child encodes, uploads
    # and records while the next call denoises; a hand-off beyond it waits (0: finish each job
    # before the next starts).
    finish_in_flight: int = Field(default=2, ge=0)
    claim_ahead: bool = True  # claim the next job while the current one's last steps run
    storing_process: bool = True  # a worker child's finisher stores outputs in a process of its own
    job_time_limit: int = 0  # hard per-job time limit in seconds (0: none)
    worker_metrics_port: int = 0  # Prometheus endpoint of a worker (`workers`: this port + GPU n); 0: none
    warm_models: str = ""  # "family[/model],..." loaded when a worker child starts
    # Runtime registry (models and LoRAs added through the API) and warm placement.
    registry_poll_interval: float = Field(default=1.0, gt=0)  # seconds between registry version reads
    placement_timeout: float = Field(default=30.0, gt=0)  # default wait of .../load and .../unload
    max_lora_bytes: int = Field(default=512 * 1024 * 1024, gt=0)  # largest LoRA upload or download
    # Model archives and LoRAs named by https:// URLs, downloaded by workers
    max_model_download_bytes: int = Field(default=64 * 1024**3, gt=0)
    model_download_timeout: float = Field(default=60.0, gt=0)  # per connect or read, not in all
    model_download_attempts: int = Field(default=3, ge=1)
    # How LoRAs switch: swapped into resident adapter slots (on), one resident adapter each (off),
    # or swapped only on models compiled on a GPU (auto)
    lora_hotswap: Literal["auto", "on", "off"] = "auto"
    engine_max_loras: int = Field(default=8, ge=1)  # LoRAs kept resident per loaded model
    # Leases and reconciliation: the database, not the broker's redelivery, decides what runs.
    job_lease_seconds: float = 30.0  # a running attempt's lease; its worker renews it while it runs
    job_retry_delays: Annotated[list[float], NoDecode] = Field(default_factory=lambda: [5.0, 30.0, 120.0])
    job_end_retry_seconds: float = 30.0  # how long a finished run retries recording its end
    reconcile_interval: float = 5.0  # seconds between the dispatcher's reconciler passes
    lost_message_grace: float = 120.0  # a queued job idle this long, its queue empty, is published again
    worker_start_timeout: float = 600.0  # seconds a child may take to build its engine and warm up
    broker_refused_timeout: float = 30.0  # a worker the broker refuses this long exits with status 1

    # Outbox relay.
    relay_batch_size: int = 200
    relay_interval: float = 0.2
    relay_linger: float = 0.05  # while busy, let a batch gather this long between publishes
    # The scheduler in the relay (docs/scheduling.md): a family gets as many messages as its online
    # workers have slots, plus this headroom, so a worker finishing a job finds the next one queued.
    scheduler_headroom: int = Field(default=1, ge=0)  # messages beyond the free slots, per family
    scheduler_headroom_per_slot: float = Field(default=0.1, ge=0)  # ... or this many per slot, if more
    scheduler_idle_window: int = Field(default=2, ge=0)  # messages for a family no worker reported
    queue_position_interval: float = Field(default=1.0, gt=0)  # seconds between position updates
    worker_heartbeat_interval: float = Field(default=3.0, gt=0)
    worker_heartbeat_timeout: float = Field(default=15.0, gt=0)  # unheard this long: offline

    # Webhooks.
    webhook_retry_delays: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: list(STANDARD_WEBHOOK_DELAYS)
    )
    webhook_timeout: float = 15.0
    webhook_concurrency: int = 32
    webhook_secret_grace_hours: float = 24.0
    webhook_poll_interval: float = 0.2
    dispatcher_metrics_port: int = 9102  # Prometheus endpoint of `dispatcher` (0: none)
    # AMQP ingress (`inference-server ingress`, docs/ingress.md).
    ingress_queue: str = "inference.requests"  # durable queue of job requests
    ingress_exchange: str = "inference.requests"  # topic exchange; routing key: the job's family
    ingress_dead_queue: str = "inference.requests.dead"  # refused messages, with their reason headers
    ingress_prefetch: int = Field(default=500, ge=1)  # unacknowledged messages held per ingress
    ingress_batch_size: int = Field(default=200, ge=1)  # messages per database transaction and ack
    ingress_batch_linger: float = Field(default=0.02, gt=0)  # seconds a partial batch waits for more
    ingress_trust_user_id: bool = False  # no authorization header: the AMQP user_id names the tenant
    ingress_relay: bool = True  # run an outbox relay in the ingress too (its jobs leave at once)
    ingress_metrics_port: int = 9103  # /metrics, /healthz and /readyz of `ingress` (0: none)

    # Retention, pruned by the dispatcher in small batches (docs/configuration.md). 0 keeps forever;
    # for outputs, 0 means no time-to-live. An event is kept while a webhook delivery refers to it.
    event_retention_days: float = Field(default=7.0, ge=0)
    outbox_retention_hours: float = Field(default=24.0, ge=0)  # published rows only
    delivery_retention_days: float = Field(default=7.0, ge=0)  # finished deliveries, with their attempts
    # Days outputs are kept after their job finished (a tenant may have its own); OUTPUT_TTL_DAYS
    # is its earlier name.
    output_retention_days: float = Field(
        default=0.0, ge=0, validation_alias=AliasChoices("output_retention_days", "output_ttl_days")
    )
    prune_interval: float = Field(default=60.0, gt=0)
    prune_batch_size: int = Field(default=500, ge=1)  # rows examined (and at most deleted) per statement

    @field_validator("webhook_retry_delays", "job_retry_delays", mode="before")
    @classmethod
    def _parse_delays(cls, value: object) -> object:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return [float(p) for p in parts]
            except ValueError as exc:
                raise ValueError("must be comma-separated seconds, e.g. 5,300,1800") from exc
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'inference-server.db'}"
        if not self.storage_url:
            self.storage_url = (self.home / "storage").resolve().as_uri()
        if self.model_cache_dir is None:
            self.model_cache_dir = self.home / "model-cache"
        if not self.api_url:
            self.api_url = f"http://{self.api_host}:{self.api_port}"
        if self.docs_require_key is None:
            self.docs_require_key = self.environment == "production"
        if not is_supported_limit_storage(self.rate_limit_storage_url):
            raise ValueError(
                "RATE_LIMIT_STORAGE_URL must be memory:// or a redis:// (rediss://, redis+sentinel://) URL"
            )
        if self.environment == "production" and self.database_url.startswith("sqlite"):
            raise ValueError("DATABASE_URL must point at PostgreSQL when ENVIRONMENT=production")
        return self


def is_supported_limit_storage(url: str) -> bool:
    """Whether the rate limiter (``api.ratelimit``) can count in the storage ``url`` names."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme in ("memory", "redis", "rediss", "redis+unix", "redis+sentinel")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first call."""
    return Settings()
