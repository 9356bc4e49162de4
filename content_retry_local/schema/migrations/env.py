"""Alembic's environment for the pipeline's own tables.

Run only through :mod:`content_retry_local.schema`, which hands over the connection.
"""

from __future__ import annotations

from alembic import context

from content_retry.tables import metadata
from content_retry_local.schema import COMPARE_OPTIONS, VERSION_TABLE

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=context.config.attributes.get("target_metadata", metadata),
    version_table=VERSION_TABLE,
    transaction_per_migration=True,
    **COMPARE_OPTIONS,
)
with context.begin_transaction():
    context.run_migrations()
