"""Test fixtures: a real PostgreSQL for the whole session, emptied after each test.

``TEST_DATABASE_URL`` names a server when set: the session creates a database
of its own there and drops it at the end, never touching the named database
(the tests empty their tables after each test). Otherwise an embedded
PostgreSQL (the pgserver wheel) is started in a temporary folder of its own
(not pytest's, which other sessions change) and removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from sqlalchemy import Connection, Engine, event, make_url, text

from content_retry.database import build_engine
from content_retry.settings import Settings, get_settings
from content_retry_local.postgres import start_embedded_postgres, stop_embedded_postgres
from content_retry_local.schema import upgrade
from content_retry_local.template import create_queues
from tests import support
from tests.support import REPO_ROOT, FakeLambdaContext

__all__ = ["REPO_ROOT", "FakeLambdaContext"]


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    server_url = os.environ.get("TEST_DATABASE_URL")
    if server_url:
        yield from _session_database(server_url)
    else:
        yield from _embedded_database()


def _embedded_database() -> Iterator[str]:
    """An embedded PostgreSQL in a folder of this session's own, removed at the end.

    Not under pytest's basetemp: as root, pgserver runs the server as its own
    user and opens the folders above the data to it, while every pytest
    session resets the permissions of the shared /tmp/pytest-of-<user> (0700),
    so another session starting would leave the server unable to reach its data.
    """
    folder = Path(tempfile.mkdtemp(prefix="content-retry-pg-"))
    try:
        yield start_embedded_postgres(folder / "data", delete_on_exit=True)
    finally:
        stop_embedded_postgres(folder / "data")
        shutil.rmtree(folder, ignore_errors=True)


def _session_database(server_url: str) -> Iterator[str]:
    """A new database on the server of ``server_url``, dropped when the session ends."""
    name = f"content_retry_test_{uuid.uuid4().hex[:12]}"
    server = build_engine(Settings(DATABASE_URL=server_url), pool_size=1)
    _outside_a_transaction(server, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE ends sessions still on it: only this session's own database.
        _outside_a_transaction(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        server.dispose()


def _outside_a_transaction(engine: Engine, statement: str) -> None:
    connection = engine.raw_connection()  # the driver's own autocommit, no SQLAlchemy begin
    try:
        connection.commit()
        connection.driver_connection.autocommit = True  # type: ignore[union-attr]
        connection.cursor().execute(statement)
    finally:
        connection.invalidate()


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    engine = build_engine(Settings(DATABASE_URL=database_url), pool_size=5)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def db(engine: Engine) -> Iterator[Engine]:
    """The test database, emptied after the test so tests never see each other's rows."""
    yield engine
    with engine.begin() as connection:
        # A test that leaked an open transaction fails here, loudly, instead of
        # the whole run waiting forever for its locks.
        connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        # Every other table of the schema refers to roadmap_metadata.
        connection.execute(text("TRUNCATE roadmap_metadata CASCADE"))


@pytest.fixture
def connection(db: Engine) -> Iterator[Connection]:
    """A connection to the test database; the test commits what it wants kept."""
    with db.connect() as connection:
        yield connection


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


@pytest.fixture
def load_event() -> Callable[[str], dict[str, Any]]:
    """The JSON of ``events/NAME`` (the same files ``sam local invoke -e`` takes)."""
    return support.load_event


@dataclass
class Queues:
    sqs: Any
    queue_url: str
    dlq_url: str

    def receive_all(self, url: str | None = None) -> list[dict[str, Any]]:
        """Every message now visible on a queue (deleted as read)."""
        url = url or self.queue_url
        messages: list[dict[str, Any]] = []
        while True:
            batch = self.sqs.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=0,
                MessageAttributeNames=["All"],
                AttributeNames=["All"],
            ).get("Messages", [])
            if not batch:
                return messages
            messages += batch
            self.sqs.delete_message_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)
                ],
            )

    def depth(self, url: str | None = None) -> int:
        attributes = self.sqs.get_queue_attributes(
            QueueUrl=url or self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]) + int(
            attributes["ApproximateNumberOfMessagesNotVisible"]
        )


@pytest.fixture
def queues(env: pytest.MonkeyPatch, db: Engine) -> Iterator[Queues]:
    """moto's SQS with the retry queue and DLQ created from template.yaml; the
    process environment set as the functions' (the handlers build their own
    engine and clients from it, as in Lambda)."""
    with mock_aws():
        sqs = boto3.client("sqs", region_name="us-east-1")
        queue_url, dlq_url = create_queues(sqs)
        env.setenv("RETRY_QUEUE_URL", queue_url)
        env.setenv("RETRY_DLQ_URL", dlq_url)
        support.reset_process_caches()
        yield Queues(sqs, queue_url, dlq_url)
        support.reset_process_caches()


@pytest.fixture
def lambda_context() -> FakeLambdaContext:
    return FakeLambdaContext()
