"""Running Alembic from mixq (`mixq db upgrade`), with no alembic.ini to find."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData

import migrations

from .db import get_engine


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["url"] = url
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def reset(url: str) -> None:
    """Drop every table of the database, whichever schema version made it (test and benchmark databases only)."""
    tables = MetaData()
    tables.reflect(bind=get_engine(url))
    tables.drop_all(get_engine(url))
