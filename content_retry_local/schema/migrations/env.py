"""Alembic's environment for the pipeline's own tables.

Run only through :func:`content_retry_local.schema.upgrade`, which hands over
the connection (and so the schema it works in); the version table is the
pipeline's own, so a platform that uses Alembic for its tables keeps its own.
"""

from __future__ import annotations

from alembic import context

from content_retry_local.schema import VERSION_TABLE

context.configure(
    connection=context.config.attributes["connection"],
    version_table=VERSION_TABLE,
    transaction_per_migration=True,
)
with context.begin_transaction():
    context.run_migrations()
