"""The database schema: ``content-retry db upgrade`` (``db init`` is its alias).

Three steps, each safe to run again and none touching a row of data:

1. the platform's tables that are missing are created (DESIGN §3), derived
   from the content types' declaration (a local or new database; the
   platform's own are left exactly as they are);
2. the pipeline's own tables are brought to the newest revision by Alembic
   (``migrations/versions``), whose version table is the pipeline's own;
3. the pipeline's indexes on the platform's tables, derived from the content
   types' declaration, are built where missing, without blocking writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, Engine, text

from content_retry_local.schema import platform

VERSION_TABLE = "content_retry_schema_version"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


@dataclass
class UpgradeReport:
    tables_created: list[str] = field(default_factory=list)
    revision_before: str | None = None
    revision_after: str | None = None
    indexes_built: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        revisions = (
            f"at revision {self.revision_after}"
            if self.revision_before == self.revision_after
            else f"revision {self.revision_before or 'none'} -> {self.revision_after}"
        )
        return (
            f"schema {revisions}; platform tables created: "
            f"{', '.join(self.tables_created) or 'none'}; indexes built: "
            f"{', '.join(self.indexes_built) or 'none'}"
        )


def _alembic_config(connection: Connection) -> object:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def current_revision(connection: Connection) -> str | None:
    """The revision the pipeline's tables are at (None: never upgraded)."""
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def head_revision() -> str:
    """The newest revision this version of the pipeline knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def upgrade(engine: Engine, *, schema: str | None = None) -> UpgradeReport:
    """Bring a database's schema to this version's; see the module's steps.

    Args:
        schema: work in this PostgreSQL schema instead of the connection's
            default (tests use scratch schemas).
    """
    from alembic import command

    report = UpgradeReport()
    with engine.connect() as connection:
        try:
            if schema is not None:
                # A local tool's session setting (never in Lambda, where it
                # would pin an RDS Proxy session), undone before the
                # connection goes back to its pool.
                quoted = '"' + schema.replace('"', '""') + '"'
                connection.execute(text(f"SET search_path TO {quoted}"))
            report.revision_before = current_revision(connection)
            connection.commit()
            with connection.begin():
                report.tables_created = platform.ensure_platform_tables(connection)
            # Alembic runs each migration in its own transaction on this connection.
            command.upgrade(_alembic_config(connection), "head")  # type: ignore[arg-type]
            report.revision_after = current_revision(connection)
            connection.commit()
            autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
            report.indexes_built = platform.ensure_pipeline_indexes(autocommit)
        finally:
            if schema is not None:
                connection.rollback()
                connection.execute(text("RESET search_path"))
                connection.commit()
    return report
