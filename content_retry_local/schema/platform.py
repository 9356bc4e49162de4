"""The platform's tables (DESIGN §3, a contract), and the pipeline's indexes on them."""

from __future__ import annotations

from sqlalchemy import Connection, Index, inspect, text
from sqlalchemy.schema import CreateIndex, CreateTable, DropIndex

from content_retry.tables import PLATFORM_TABLES, SWEEP_INDEX_PREFIX, roadmap_metadata

# The sweep's index on roadmap_metadata; its name carries a digest of its predicate.
SWEEP_INDEX: Index = next(
    index for index in roadmap_metadata.indexes if str(index.name).startswith(SWEEP_INDEX_PREFIX)
)

_INDEX_VALID = text(
    "SELECT i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
    "WHERE c.relname = :name AND pg_table_is_visible(c.oid)"
)
_SWEEP_INDEXES = text(
    "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
    "AND tablename = :table AND indexname LIKE :prefix"
)


def pipeline_indexes() -> list[Index]:
    """The pipeline's indexes on the platform's tables, the sweep's first."""
    return [
        index
        for table in PLATFORM_TABLES
        for index in sorted(table.indexes, key=lambda index: str(index.name))
    ]


def ensure_platform_tables(connection: Connection) -> list[str]:
    """Create the platform's tables that do not exist; returns the ones created.

    Only the tables: their indexes are :func:`ensure_pipeline_indexes`'.
    """
    created = []
    for table in PLATFORM_TABLES:
        if not inspect(connection).has_table(table.name):
            connection.execute(CreateTable(table))
            created.append(table.name)
    return created


def ensure_pipeline_indexes(autocommit: Connection) -> list[str]:
    """Create the pipeline's indexes on the platform's tables; returns the ones built.

    Runs on a connection in autocommit mode (``CREATE INDEX CONCURRENTLY``
    cannot run in a transaction). An index left invalid by an interrupted
    build is rebuilt; a sweep index of an earlier set of content types is
    dropped once the current one is built.
    """
    built = []
    for index in pipeline_indexes():
        valid = autocommit.execute(_INDEX_VALID, {"name": index.name}).scalar_one_or_none()
        if valid:
            continue
        if valid is False:
            autocommit.execute(DropIndex(index, if_exists=True))
        autocommit.execute(CreateIndex(index, if_not_exists=True))
        built.append(str(index.name))
    sweep_indexes = autocommit.execute(
        _SWEEP_INDEXES, {"table": roadmap_metadata.name, "prefix": f"{SWEEP_INDEX_PREFIX}%"}
    ).scalars()
    for name in [name for name in sweep_indexes if name != SWEEP_INDEX.name]:
        autocommit.execute(DropIndex(Index(name, postgresql_concurrently=True), if_exists=True))
    return built
