"""Tables: the platform's own (DESIGN §3, a contract) and the pipeline's.

The platform's tables are declared exactly as the contract gives them; the
pipeline only adds indexes to them. :func:`create_missing` creates whatever is
absent and leaves everything that exists as it is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.engine import Connection
from sqlalchemy.types import TypeEngine

from content_retry.content_types import STORAGE, ContentType
from content_retry.sweep import SWEEP_CANDIDATE_PREDICATE

metadata = MetaData()

roadmap_metadata = Table(
    "roadmap_metadata",
    metadata,
    Column("roadmap_id", Text, primary_key=True),
    Column("user_id", Text, nullable=False),
    Column("title", Text),
    Column("framework_data", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Index(
        "roadmap_metadata_sweep_candidates",
        "updated_at",
        postgresql_where=text(SWEEP_CANDIDATE_PREDICATE),
    ),
)


def _content_table(
    content_type: ContentType, payload_column: str | None, payload: TypeEngine[Any] | None
) -> Table:
    storage = STORAGE[content_type]
    columns: list[Column[Any]] = [
        Column(
            storage.id_column,
            UUID(as_uuid=False),
            primary_key=True,
            server_default=text("gen_random_uuid()"),
        ),
        Column(
            "roadmap_id",
            Text,
            ForeignKey("roadmap_metadata.roadmap_id", ondelete="CASCADE"),
            nullable=False,
        ),
        Column("concept_id", Text, nullable=False),
        Column("title", Text),
    ]
    if payload_column is not None and payload is not None:
        columns.append(Column(payload_column, payload))
    columns += [
        Column("content_status", Text, nullable=False),
        Column("content_version", Integer, nullable=False, server_default=text("1")),
        Column("is_latest", Boolean, nullable=False, server_default=text("true")),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    ]
    return Table(
        storage.table,
        metadata,
        *columns,
        # "At most one row per (roadmap_id, concept_id) has is_latest = true": the
        # database holds the invariant, and the judge's lookups use this index.
        Index(
            f"{storage.table}_one_latest_per_concept",
            "roadmap_id",
            "concept_id",
            unique=True,
            postgresql_where=text("is_latest"),
        ),
        # The sweep's second source of candidates: roadmaps whose latest row is
        # not completed, whatever framework_data says. Only such rows are indexed.
        Index(
            f"{storage.table}_unfinished_latest",
            "roadmap_id",
            postgresql_where=text("is_latest AND content_status <> 'completed'"),
        ),
    )


tutorials = _content_table(ContentType.TUTORIAL, "content", Text())
resource_recommendations = _content_table(ContentType.RESOURCES, "resources", JSONB())
quizzes = _content_table(ContentType.QUIZ, "questions", JSONB())

CONTENT_TABLES: dict[ContentType, Table] = {
    ContentType.TUTORIAL: tutorials,
    ContentType.RESOURCES: resource_recommendations,
    ContentType.QUIZ: quizzes,
}

retry_tasks = Table(
    "retry_tasks",
    metadata,
    Column(
        "task_id", UUID(as_uuid=False), primary_key=True, server_default=text("gen_random_uuid()")
    ),
    Column(
        "roadmap_id",
        Text,
        ForeignKey("roadmap_metadata.roadmap_id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("user_id", Text, nullable=False),
    Column("trigger", Text, nullable=False),
    Column("preferences", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # A task's status is not stored: it is derived from its items when read
    # (ledger.task_status), so concurrent workers never race to maintain it.
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint("trigger IN ('api', 'sweep', 'invoke')", name="retry_tasks_trigger_known"),
    Index("retry_tasks_by_roadmap", "roadmap_id", "created_at"),
)

# The item ledger: one row per planned (task, concept, content type). A row in a
# claiming status and younger than the lease is a live claim (DESIGN §4).
retry_items = Table(
    "retry_items",
    metadata,
    Column("task_id", UUID(as_uuid=False), nullable=False),
    Column("concept_id", Text, nullable=False),
    Column("content_type", Text, nullable=False),
    Column("roadmap_id", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'queued'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("claimed_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    PrimaryKeyConstraint("task_id", "concept_id", "content_type", name="retry_items_pkey"),
    ForeignKeyConstraint(["task_id"], ["retry_tasks.task_id"], ondelete="CASCADE"),
    CheckConstraint(
        "status IN ('queued', 'running', 'succeeded', 'failed', 'dead_lettered')",
        name="retry_items_status_known",
    ),
    CheckConstraint(
        "content_type IN ('tutorial', 'resources', 'quiz')", name="retry_items_content_type_known"
    ),
    CheckConstraint("reason IN ('missing', 'failed', 'stale')", name="retry_items_reason_known"),
    # The judge looks up live claims of one roadmap; only claiming rows are indexed,
    # so the index stays as small as the work in flight.
    Index(
        "retry_items_live_claims",
        "roadmap_id",
        "concept_id",
        "content_type",
        postgresql_where=text("status IN ('queued', 'running')"),
    ),
)


# When the sweep last judged each roadmap: it judges the least recently judged
# first and each at most once a claim lease, so roadmaps it cannot plan (say a
# status the judge does not repair) never starve the others.
roadmap_sweeps = Table(
    "roadmap_sweeps",
    metadata,
    Column(
        "roadmap_id",
        Text,
        ForeignKey("roadmap_metadata.roadmap_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("swept_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)


def create_missing(connection: Connection) -> list[str]:
    """Create the tables and indexes that do not exist yet; touch nothing else.

    Safe to run any number of times: it never drops, alters or rewrites an
    existing table. Returns the names of the tables it created.
    """
    existing = set(
        connection.execute(
            text("SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = current_schema()")
        ).scalars()
    )
    # checkfirst=True makes SQLAlchemy issue CREATE only for absent tables and
    # indexes; existing ones (and their data) are left exactly as they are.
    metadata.create_all(connection, checkfirst=True)
    for table in metadata.sorted_tables:
        for index in table.indexes:
            index.create(connection, checkfirst=True)
    return [table.name for table in metadata.sorted_tables if table.name not in existing]
