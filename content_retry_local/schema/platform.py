"""The platform's tables (DESIGN §3, a contract), and the pipeline's indexes on them.

Both are derived from the content types' one declaration
(:data:`content_retry.content_types.STORAGE`), so a new content type gets its
table (where the platform has not made it) and its indexes without a
migration. Tables are only created when absent; indexes are created
``CONCURRENTLY``, so a large platform table keeps taking writes meanwhile.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import Connection, text

from content_retry.content_types import STORAGE, ContentStorage
from content_retry.statuses import ContentStatus
from content_retry.sweep import SWEEP_CANDIDATE_PREDICATE

ROADMAP_METADATA = """
CREATE TABLE IF NOT EXISTS roadmap_metadata (
  roadmap_id     text PRIMARY KEY,
  user_id        text NOT NULL,
  title          text,
  framework_data jsonb NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT now(),
  updated_at     timestamptz NOT NULL DEFAULT now()
)"""


def content_table(storage: ContentStorage) -> str:
    """DDL of one content type's table, as the contract gives it."""
    return f"""
CREATE TABLE IF NOT EXISTS {storage.table} (
  {storage.id_column} uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  roadmap_id      text NOT NULL REFERENCES roadmap_metadata ON DELETE CASCADE,
  concept_id      text NOT NULL,
  title           text,
  {storage.payload_column} {storage.payload_sql_type},
  content_status  text NOT NULL,
  content_version integer NOT NULL DEFAULT 1,
  is_latest       boolean NOT NULL DEFAULT true,
  created_at      timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class PipelineIndex:
    """An index the pipeline keeps on a platform table."""

    name: str
    table: str
    definition: str  # what follows ``ON <table>``
    unique: bool = False

    def create(self) -> str:
        unique = "UNIQUE " if self.unique else ""
        return (
            f"CREATE {unique}INDEX CONCURRENTLY IF NOT EXISTS {self.name} "
            f"ON {self.table} {self.definition}"
        )


# The sweep's first candidate source. Its name carries a digest of its
# predicate: when the content types change, the predicate does, and the
# upgrade builds the new index before dropping the old one.
SWEEP_INDEX_PREFIX = "roadmap_metadata_sweep_candidates"
SWEEP_INDEX = PipelineIndex(
    f"{SWEEP_INDEX_PREFIX}_{hashlib.sha256(SWEEP_CANDIDATE_PREDICATE.encode()).hexdigest()[:8]}",
    "roadmap_metadata",
    f"(updated_at) WHERE {SWEEP_CANDIDATE_PREDICATE}",
)


def content_indexes(storage: ContentStorage) -> list[PipelineIndex]:
    return [
        # "At most one row per (roadmap_id, concept_id) has is_latest = true":
        # the database holds the invariant, and the judge's lookups use it.
        PipelineIndex(
            f"{storage.table}_one_latest_per_concept",
            storage.table,
            "(roadmap_id, concept_id) WHERE is_latest",
            unique=True,
        ),
        # A saved version is numbered after every version the concept has, the
        # old ones included (an item lost from the latest row may have history):
        # without this the save reads the whole table for that maximum, an
        # index lookup with it. The contract's tables have no other index here.
        PipelineIndex(
            f"{storage.table}_versions_per_concept",
            storage.table,
            "(roadmap_id, concept_id, content_version)",
        ),
        # The sweep's second source of candidates: roadmaps whose latest row is
        # not completed, whatever framework_data says. Only such rows are indexed.
        PipelineIndex(
            f"{storage.table}_unfinished_latest",
            storage.table,
            f"(roadmap_id) WHERE is_latest AND content_status <> '{ContentStatus.COMPLETED}'",
        ),
    ]


def ensure_platform_tables(connection: Connection) -> list[str]:
    """Create the platform's tables that do not exist; returns the ones created."""
    wanted = ["roadmap_metadata", *(storage.table for storage in STORAGE.values())]
    before = _existing_tables(connection)
    connection.execute(text(ROADMAP_METADATA))
    for storage in STORAGE.values():
        connection.execute(text(content_table(storage)))
    return [table for table in wanted if table not in before]


def ensure_pipeline_indexes(autocommit: Connection) -> list[str]:
    """Create the pipeline's indexes on the platform's tables; returns the ones built.

    Runs on a connection in autocommit mode (``CREATE INDEX CONCURRENTLY``
    cannot run in a transaction). An index left invalid by an interrupted
    build is rebuilt; a sweep index of an earlier set of content types is
    dropped once the current one is built.
    """
    built = []
    wanted = [SWEEP_INDEX, *(i for s in STORAGE.values() for i in content_indexes(s))]
    for index in wanted:
        valid = autocommit.execute(
            text(
                "SELECT i.indisvalid FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
                "WHERE c.relname = :name AND pg_table_is_visible(c.oid)"
            ),
            {"name": index.name},
        ).scalar_one_or_none()
        if valid:
            continue
        if valid is False:
            autocommit.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {index.name}"))
        autocommit.execute(text(index.create()))
        built.append(index.name)
    stale = autocommit.execute(
        text(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = 'roadmap_metadata' AND indexname LIKE :prefix "
            "AND indexname <> :current"
        ),
        {"prefix": f"{SWEEP_INDEX_PREFIX}%", "current": SWEEP_INDEX.name},
    ).scalars()
    for name in list(stale):
        autocommit.execute(text(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"'))
    return built


def _existing_tables(connection: Connection) -> set[str]:
    return set(
        connection.execute(
            text("SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = current_schema()")
        ).scalars()
    )
