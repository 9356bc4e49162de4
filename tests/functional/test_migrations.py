"""``content-retry db upgrade``: any earlier schema of this project to head, data untouched.

Each test works in scratch PostgreSQL schemas of its own, dropped afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, Engine, text

from content_retry_local.schema import VERSION_TABLE, head_revision, upgrade
from content_retry_local.schema.platform import SWEEP_INDEX, SWEEP_INDEX_PREFIX
from content_retry_local.seed import seed_scenario
from tests.support import REPO_ROOT

SCHEMA_0_1_0 = REPO_ROOT / "tests/fixtures/schema-0.1.0.sql"


@pytest.fixture
def scratch(db: Engine) -> Iterator[list[str]]:
    """Names of fresh schemas to work in; every one of them is dropped at the end."""
    made: list[str] = []

    def new() -> str:
        name = f"scratch_{uuid.uuid4().hex[:12]}"
        with db.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{name}"'))
        made.append(name)
        return name

    names: list[str] = [new(), new()]
    yield names
    with db.begin() as connection:
        for name in made:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


def in_schema(connection: Connection, schema: str) -> Connection:
    connection.execute(text(f'SET search_path TO "{schema}"'))
    return connection


def describe(db: Engine, schema: str) -> dict[str, set[tuple[str, ...]]]:
    """Tables, columns, constraints and indexes of a schema, with its name left out."""
    with db.connect() as connection:
        in_schema(connection, schema)
        columns = connection.execute(
            text(
                "SELECT table_name, column_name, data_type, is_nullable, "
                "coalesce(column_default, '') FROM information_schema.columns "
                "WHERE table_schema = :s"
            ),
            {"s": schema},
        ).all()
        constraints = connection.execute(
            text(
                "SELECT c.relname, k.conname, pg_get_constraintdef(k.oid) FROM pg_constraint AS k "
                "JOIN pg_class AS c ON c.oid = k.conrelid JOIN pg_namespace AS n "
                "ON n.oid = c.relnamespace WHERE n.nspname = :s"
            ),
            {"s": schema},
        ).all()
        indexes = connection.execute(
            text("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = :s"),
            {"s": schema},
        ).all()
        connection.execute(text("RESET search_path"))
        connection.commit()
    return {
        "columns": {tuple(str(value) for value in row) for row in columns},
        "constraints": {tuple(str(value) for value in row) for row in constraints},
        "indexes": {
            (row.tablename, row.indexname, row.indexdef.replace(f"{schema}.", ""))
            for row in indexes
        },
    }


def apply_sql(db: Engine, schema: str, path: Path) -> None:
    with db.begin() as connection:
        in_schema(connection, schema)
        sql = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("--"))
        for statement in sql.split(";"):
            if statement.strip():
                connection.execute(text(statement))
        connection.execute(text("RESET search_path"))


def test_a_database_made_by_0_1_db_init_upgrades_to_what_a_fresh_one_is(
    db: Engine, scratch: list[str]
) -> None:
    # GIVEN a database made by 0.1.0's `db init` (no version table), holding data
    old, fresh = scratch
    apply_sql(db, old, SCHEMA_0_1_0)
    with db.begin() as connection:
        seed_scenario(in_schema(connection, old), other_failures=True)
        connection.execute(text("RESET search_path"))

    # WHEN it is upgraded, and a new, empty one is too
    report = upgrade(db, schema=old)
    upgrade(db, schema=fresh)

    # THEN both are the same schema, at head; the rows are all there
    assert (report.revision_before, report.revision_after) == (None, head_revision())
    assert report.tables_created == []
    assert describe(db, old) == describe(db, fresh)
    with db.connect() as connection:
        in_schema(connection, old)
        counts = [
            connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("roadmap_metadata", "tutorials", "resource_recommendations", "quizzes")
        ]
        connection.execute(text("RESET search_path"))
        connection.commit()
    assert counts == [1, 10, 31, 31]
    # the sweep index of 0.1.0's content types was replaced by the current one
    indexes = {name for _, name, _ in describe(db, old)["indexes"]}
    assert {name for name in indexes if name.startswith(SWEEP_INDEX_PREFIX)} == {SWEEP_INDEX.name}


def test_the_upgrade_can_run_again_and_changes_nothing(db: Engine, scratch: list[str]) -> None:
    schema = scratch[0]
    upgrade(db, schema=schema)
    before = describe(db, schema)

    again = upgrade(db, schema=schema)

    assert (again.revision_before, again.revision_after) == (head_revision(), head_revision())
    assert (again.tables_created, again.indexes_built) == ([], [])
    assert describe(db, schema) == before


def test_the_version_table_is_the_pipelines_own(db: Engine, scratch: list[str]) -> None:
    schema = scratch[0]
    upgrade(db, schema=schema)

    tables = {row[0] for row in describe(db, schema)["columns"]}

    assert VERSION_TABLE in tables
    assert "alembic_version" not in tables  # a platform's own Alembic keeps its table


def test_an_existing_platform_table_is_never_altered(db: Engine, scratch: list[str]) -> None:
    # GIVEN a platform whose roadmap_metadata has a column of its own, and a row
    schema = scratch[0]
    with db.begin() as connection:
        in_schema(connection, schema)
        connection.execute(
            text(
                "CREATE TABLE roadmap_metadata (roadmap_id text PRIMARY KEY, user_id text NOT "
                "NULL, title text, framework_data jsonb NOT NULL, created_at timestamptz NOT "
                "NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(), "
                "platform_column text)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO roadmap_metadata (roadmap_id, user_id, framework_data, "
                "platform_column) VALUES ('r', 'u', '{}', 'kept')"
            )
        )
        connection.execute(text("RESET search_path"))

    # WHEN the schema is upgraded
    report = upgrade(db, schema=schema)

    # THEN the rest was created, and the platform's table and row were left alone
    assert "roadmap_metadata" not in report.tables_created
    assert {"tutorials", "quizzes"} <= set(report.tables_created)
    with db.connect() as connection:
        in_schema(connection, schema)
        kept = connection.execute(text("SELECT platform_column FROM roadmap_metadata"))
        assert kept.scalar_one() == "kept"
        connection.execute(text("RESET search_path"))
        connection.commit()
