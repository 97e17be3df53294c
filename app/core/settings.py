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
    # Each call to the Hub (HF_ENDPOINT) gives up after this long.
    hub_timeout_seconds: float = 10.0

    # Workers
    device: str = "cpu"
    threads: int | None = None
    queue: str = "cpu"  # GPU workers consume "gpu"
    # Sweeps and registry ticks: their own queue and small worker, never behind a job; webhook deliveries on
    # another, with a worker of their own, so that receivers that never answer cannot delay a sweep or a tick.
    housekeeping_queue: str = "housekeeping"
    webhook_queue: str = "webhooks"
    job_soft_time_limit: int = 3 * 3600
    job_time_limit: int = 3 * 3600 + 300
    # Timing per layer in the latency profile (more is steadier, less is quicker).
    profile_seconds_per_layer: float = 0.5
    heartbeat_seconds: float = 5.0
    # A running job whose heartbeat is older than this is presumed dead and requeued...
    stale_after_seconds: float = 60.0
    # ...at most this many runs in all: a job that keeps killing its worker (memory, hard time limit) fails.
    max_attempts: int = 3
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
    # A request's head must arrive within `header_timeout_seconds` (else the connection closes: sockets that
    # send nothing cannot pile up), its body within `body_timeout_seconds` (408); one API process serves at
    # most `max_connections` requests at once (503 beyond); idle keep-alive connections close after the last.
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 10.0
    max_connections: int = 200
    keep_alive_seconds: float = 5.0
    # Host headers the API answers (comma-separated; "*" for any). Unset: loopback names when it runs
    # without keys (so a web page cannot reach it by DNS rebinding), any host when keys are required.
    allowed_hosts: str | None = None
    # Bearer token for /metrics (every tenant's counts); unset, /metrics answers only without keys.
    metrics_token: str | None = None
    # Quotas and limits on what one request or tenant may ask for (see worker/engine/sizing.py).
    max_active_jobs_per_tenant: int = 20
    max_job_memory_bytes: int = 16 * 2**30
    max_job_sample_passes: int = 1_000_000
    # Registry: entries per tenant, the shortest interval a schedule may have, and how many due entries one
    # scheduler tick fires (the oldest due first; the rest on the next tick).
    max_registry_entries_per_tenant: int = 100
    min_interval_seconds: int = 300
    registry_tick_batch: int = 100
    # How long a process remembers which tenant an API key belongs to (a revoked key works this long at most).
    key_cache_seconds: float = 5.0

    # Webhooks: targets must match the operator's allow-list (comma-separated host or host:port);
    # payloads are signed with HMAC-SHA256 of this secret.
    webhook_allowlist: str = ""
    webhook_secret: str | None = None
    # One delivery attempt gives up after this long in all, however slowly the receiver answers.
    webhook_timeout_seconds: float = 10.0
    # Tenants (comma-separated names) whose jobs may use the workers' HF_TOKEN for the Hub; every other
    # tenant's requests go to the Hub anonymously, so they can never reach the operator's private repos.
    hf_token_tenants: str = ""
    scheduler_tick_seconds: float = 15.0

    @model_validator(mode="after")
    def _absolute_defaults_under_data_dir(self) -> "Settings":
        """Every path absolute, as of the directory the process started in: workers then run elsewhere."""
        self.data_dir = self.data_dir.resolve()
        self.database_url = _absolute_sqlite(self.database_url or f"sqlite:///{self.data_dir / 'mixq.db'}")
        self.broker_url = _absolute_sqlite(self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}")
        self.artifacts_dir = (self.artifacts_dir or self.data_dir / "artifacts").resolve()
        self.cache_dir = (self.cache_dir or self.data_dir / "cache").resolve()
        self.model_root = self.model_root and self.model_root.resolve()
        return self

    def environment(self) -> dict[str, str]:
        """These settings as the environment of a child process, whatever its working directory."""
        paths = {"MIXQ_DATA_DIR": self.data_dir, "MIXQ_DATABASE_URL": self.database_url,
                 "MIXQ_BROKER_URL": self.broker_url, "MIXQ_ARTIFACTS_DIR": self.artifacts_dir,
                 "MIXQ_CACHE_DIR": self.cache_dir, "MIXQ_MODEL_ROOT": self.model_root}
        return {name: str(value) for name, value in paths.items() if value is not None}

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("sqla+")


def _absolute_sqlite(url: str) -> str:
    """sqlite:///relative.db (and the sqla+sqlite broker form) made absolute."""
    scheme, separator, path = url.partition(":///")
    if separator and scheme.endswith("sqlite") and path and not path.startswith(("/", ":memory:")):
        return f"{scheme}:///{Path(path).resolve()}"
    return url


@lru_cache
def get_settings() -> Settings:
    return Settings()
