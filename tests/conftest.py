"""Test fixtures: a real PostgreSQL for the whole session, emptied after each test.

``TEST_DATABASE_URL`` names the server when set; otherwise an embedded
PostgreSQL (the pgserver wheel) is started in a temporary folder and removed
at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session

from content_retry.database import build_engine, create_missing
from content_retry.database.schema import metadata
from content_retry.local.postgres import start_embedded_postgres
from content_retry.settings import Settings, get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    return start_embedded_postgres(
        tmp_path_factory.mktemp("postgres") / "data", delete_on_exit=True
    )


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = build_engine(Settings(DATABASE_URL=database_url), pool_size=5)
    with engine.begin() as connection:
        create_missing(connection)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: Engine) -> Iterator[Engine]:
    """The test database, emptied after the test so tests never see each other's rows."""
    yield engine
    tables = ", ".join(table.name for table in metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} CASCADE"))


@pytest.fixture
def session(db: Engine) -> Iterator[Session]:
    with Session(db) as session:
        yield session


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, database_url: str) -> Iterator[pytest.MonkeyPatch]:
    """The process environment as a Lambda would have it, settings re-read."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


class StatementCounter:
    """Counts the SQL statements an engine executes (SQLAlchemy events)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []

    def _record(self, conn: object, cursor: object, statement: str, *args: object) -> None:
        self.statements.append(statement)

    def __enter__(self) -> StatementCounter:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)

    @property
    def count(self) -> int:
        return len(self.statements)


@pytest.fixture
def count_statements(db: Engine) -> StatementCounter:
    return StatementCounter(db)
