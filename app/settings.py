"""All of mixq's settings, from environment variables with the MIXQ_ prefix."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXQ_")

    data_dir: Path = Path("var")
    # Local models and data files may only come from under this folder; unset, local paths are refused.
    model_root: Path | None = None
    cache_dir: Path | None = None
    device: str = "cpu"
    threads: int | None = None

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"


@lru_cache
def get_settings() -> Settings:
    return Settings()
