"""All of mixq's settings, from environment variables with the MIXQ_ prefix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXQ_")

    # State: the embedded default keeps everything under data_dir (SQLite, broker, artifacts, cache).
    data_dir: Path = Path("var")
    database_url: str | None = None  # default sqlite:///<data_dir>/mixq.db; production postgresql+psycopg://
    broker_url: str | None = None  # default sqla+sqlite:///<data_dir>/broker.db; production redis://
    artifacts_dir: Path | None = None
    cache_dir: Path | None = None
    # Local models and data files may only come from under this folder; unset, local paths are refused.
    model_root: Path | None = None

    # Workers
    device: str = "cpu"
    threads: int | None = None
    queue: str = "cpu"  # GPU workers consume "gpu"
    job_soft_time_limit: int = 3 * 3600
    job_time_limit: int = 3 * 3600 + 300
    # Timing per layer in the latency profile (more is steadier, less is quicker).
    profile_seconds_per_layer: float = 0.5
    heartbeat_seconds: float = 5.0
    # A running job whose heartbeat is older than this is presumed dead and requeued.
    stale_after_seconds: float = 60.0
    # The sweeper (beat): how often it runs; it publishes queued jobs never published after this grace,
    # and publishes again those still unclaimed this long after (the claim tolerates duplicates).
    sweep_seconds: float = 30.0
    publish_grace_seconds: float = 10.0
    unclaimed_after_seconds: float = 300.0
    # A queued job that could not be published for this long fails (the broker is presumed gone).
    publish_deadline_seconds: float = 600.0
    broker_timeout_seconds: float = 5.0

    # API
    api_url: str = "http://127.0.0.1:8000"  # for the CLI client
    api_key: str | None = None  # for the CLI client
    # Only `mixq serve` on a loopback address reads this; unset, the embedded default runs without auth.
    auth_disabled: bool | None = None
    max_body_bytes: int = 64 * 1024
    # How long a process remembers which tenant an API key belongs to (a revoked key works this long at most).
    key_cache_seconds: float = 5.0

    # Webhooks: targets must match the operator's allow-list (comma-separated host or host:port);
    # payloads are signed with HMAC-SHA256 of this secret.
    webhook_allowlist: str = ""
    webhook_secret: str | None = None
    scheduler_tick_seconds: float = 15.0

    @model_validator(mode="after")
    def _defaults_under_data_dir(self) -> "Settings":
        self.database_url = self.database_url or f"sqlite:///{self.data_dir / 'mixq.db'}"
        self.broker_url = self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        self.artifacts_dir = self.artifacts_dir or self.data_dir / "artifacts"
        self.cache_dir = self.cache_dir or self.data_dir / "cache"
        return self

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("sqla+")


@lru_cache
def get_settings() -> Settings:
    return Settings()
