"""Alembic environment: the database URL comes from mixq's settings (MIXQ_DATABASE_URL)."""

from alembic import context

from app.core.db import get_engine
from app.core.models import Base

config = context.config


def run_migrations_online() -> None:
    url = config.attributes.get("url")
    with get_engine(url).connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
