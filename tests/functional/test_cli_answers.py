"""The command line's answers (issue 22): settings given in part are refused, never
completed with local ones; failures a person can cause are one line naming the
cause and the fix; ``--debug`` adds the traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, NoCredentialsError
from sqlalchemy import Engine, make_url

from content_retry_local.aws import start_threaded_moto
from content_retry_local.errors import REFUSED, explain
from tests.conftest import _outside_a_transaction
from tests.functional.test_local_runtime import run_cli

TASK_ID = "9b2c0f4e-3d1a-4c55-9a8e-2f6d7c1b5a90"
# No AWS credentials anywhere botocore looks (the variables are dropped by run_cli).
NO_CREDENTIALS = {
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def one_line_error(stderr: str) -> str:
    """The answer, which must be the last and only ``error:`` line, with no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]


@pytest.mark.parametrize(
    ("given", "command", "says"),
    [
        (
            {"DB_HOST": "proxy.example", "DB_NAME": "roadmaps", "DB_USER": "app"},
            ("db", "upgrade"),
            "DB_HOST, DB_NAME and DB_USER are set but DB_AUTH is not",
        ),
        ({"DB_HOST": "proxy.example"}, ("status", TASK_ID), "(and DB_NAME and DB_USER)"),
        ({"DB_PORT": "5433"}, ("db", "upgrade"), "DB_PORT is set but DB_AUTH is not"),
        ({"DB_AUTH": "iam"}, ("status", TASK_ID), "DB_AUTH=iam also needs DB_HOST"),
        (
            {"DB_AUTH": "secret", "DB_HOST": "h", "DB_NAME": "n", "DB_USER": "u"},
            ("db", "upgrade"),
            "DB_AUTH=secret also needs DB_SECRET_ARN",
        ),
        (
            {"DATABASE_URL": "postgresql://u@h/d", "DB_HOST": "proxy.example"},
            ("status", TASK_ID),
            "DATABASE_URL and DB_HOST are both set",
        ),
        (
            {"DATABASE_URL": "mysql://u:hunter2@h/d"},
            ("db", "upgrade"),
            "DATABASE_URL (mysql://...@h/d) is not a PostgreSQL URL",
        ),
        ({"DATABASE_URL": "roadmaps"}, ("status", TASK_ID), "is not a PostgreSQL URL"),
        (
            {"RETRY_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/1/q"},
            ("redrive", "--dry-run"),
            "RETRY_QUEUE_URL is set but RETRY_DLQ_URL is not",
        ),
        (
            {"RETRY_DLQ_URL": "https://sqs.eu-west-1.amazonaws.com/1/d"},
            ("redrive",),
            "RETRY_DLQ_URL is set but RETRY_QUEUE_URL is not",
        ),
        (
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:4566"},
            ("redrive", "--dry-run"),
            "AWS_ENDPOINT_URL is set but RETRY_QUEUE_URL and RETRY_DLQ_URL are not",
        ),
        (
            {"DATABASE_URL": "postgresql://u@h/d", "RETRY_QUEUE_URL": "https://q"},
            ("drain",),
            "RETRY_QUEUE_URL is set but RETRY_DLQ_URL is not",
        ),
        ({"DB_HOST": "proxy.example"}, ("demo",), "refuses to run with DB_HOST set"),
        ({"DB_NAME": "roadmaps"}, ("seed",), "unset DB_NAME"),
        ({"DATABASE_URL": "postgresql://u@h/d"}, ("seed",), "embedded PostgreSQL only"),
    ],
    ids=[
        "db-without-auth",
        "host-alone",
        "port-alone",
        "auth-alone",
        "secret-without-arn",
        "url-and-db-vars",
        "url-not-postgresql",
        "url-not-a-url",
        "queue-without-dlq",
        "dlq-without-queue",
        "endpoint-without-queues",
        "drain-half-queues",
        "demo-db-host",
        "seed-db-name",
        "seed-given-database",
    ],
)
def test_settings_given_in_part_are_refused_before_anything_starts(
    tmp_path: Path, given: dict[str, str], command: tuple[str, ...], says: str
) -> None:
    # WHEN a command runs with a database or queues given in part
    run = run_cli(tmp_path, given, *command)

    # THEN it exits 2 with one line saying what is missing, and started nothing
    # (no embedded PostgreSQL, no moto: the local fallback is never taken)
    assert run.returncode == 2, run.stdout + run.stderr
    assert says in one_line_error(run.stderr)
    assert "hunter2" not in run.stderr
    assert not (tmp_path / ".local").exists()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_an_unreachable_database_is_one_line_and_debug_shows_the_traceback(
    tmp_path: Path,
) -> None:
    # GIVEN a DATABASE_URL nothing answers on
    port = closed_port()
    given = {"DATABASE_URL": f"postgresql://app:hunter2@127.0.0.1:{port}/roadmaps"}

    # WHEN a command needs it, then the same with --debug
    run = run_cli(tmp_path, given, "status", TASK_ID)
    debug = run_cli(tmp_path, given, "--debug", "status", TASK_ID)

    # THEN one line names where and why, and what to check; --debug adds the traceback
    assert run.returncode == 1
    line = one_line_error(run.stderr)
    assert f"cannot connect to the database at 127.0.0.1:{port} (DATABASE_URL)" in line
    assert "Connection refused" in line and "unset them to use the embedded" in line
    assert "hunter2" not in run.stderr
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and debug.stderr.rstrip().endswith(line)


@pytest.fixture
def empty_database(engine: Engine, database_url: str) -> Iterator[str]:
    """A database on the test server without content-retry's schema."""
    name = f"content_retry_empty_{closed_port()}"
    _outside_a_transaction(engine, f'CREATE DATABASE "{name}"')
    yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    _outside_a_transaction(engine, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_database_without_the_schema_is_told_to_upgrade(
    tmp_path: Path, empty_database: str
) -> None:
    run = run_cli(tmp_path, {"DATABASE_URL": empty_database}, "status", TASK_ID)

    assert run.returncode == 1
    line = one_line_error(run.stderr)
    assert "has not got content-retry's schema" in line
    assert "run `content-retry db upgrade`" in line


def test_a_database_that_does_not_exist_is_named(tmp_path: Path, database_url: str) -> None:
    missing = make_url(database_url).set(database="no_such_database")
    given = {"DATABASE_URL": missing.render_as_string(hide_password=False)}

    run = run_cli(tmp_path, given, "db", "upgrade")

    assert run.returncode == 1
    line = one_line_error(run.stderr)
    assert 'database "no_such_database" does not exist' in line
    assert "check the database name" in line


def test_iam_auth_without_credentials_says_how_to_give_them(tmp_path: Path) -> None:
    # GIVEN RDS Proxy with IAM auth, and no AWS credentials anywhere
    given = {
        "DB_AUTH": "iam",
        "DB_HOST": "127.0.0.1",
        "DB_PORT": str(closed_port()),
        "DB_NAME": "roadmaps",
        "DB_USER": "app",
        **NO_CREDENTIALS,
    }

    # WHEN a command connects
    run = run_cli(tmp_path, given, "status", TASK_ID)

    # THEN it says the credentials are missing, what needs them, and how to give them
    assert run.returncode == REFUSED
    line = one_line_error(run.stderr)
    assert "no AWS credentials found (DB_AUTH=iam signs each database login" in line
    assert "AWS_PROFILE" in line and "AWS_ACCESS_KEY_ID" in line


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    endpoint, server = start_threaded_moto()
    yield endpoint
    server.stop()


def test_queues_that_do_not_exist_and_aws_out_of_reach_are_answers(
    tmp_path: Path, moto_endpoint: str
) -> None:
    # GIVEN an endpoint whose queues were never created, and one nothing answers on
    keys = {
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_REGION": "us-east-1",
    }
    absent = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "RETRY_QUEUE_URL": f"{moto_endpoint}/000000000000/nope",
        "RETRY_DLQ_URL": f"{moto_endpoint}/000000000000/nope-dlq",
        **keys,
    }
    away = f"http://127.0.0.1:{closed_port()}"
    unreachable = {
        "AWS_ENDPOINT_URL": away,
        "RETRY_QUEUE_URL": f"{away}/000000000000/q",
        "RETRY_DLQ_URL": f"{away}/000000000000/d",
        **keys,
    }

    # WHEN the queues are used
    missing = run_cli(tmp_path, absent, "redrive", "--dry-run")
    gone = run_cli(tmp_path, unreachable, "redrive", "--dry-run")

    # THEN each is one line naming the cause and what to check
    assert missing.returncode == 1
    assert "the queue does not exist" in one_line_error(missing.stderr)
    assert "check RETRY_QUEUE_URL and RETRY_DLQ_URL" in missing.stderr
    assert gone.returncode == 1
    assert f"cannot reach AWS at {away}" in one_line_error(gone.stderr)


def test_given_queues_without_credentials_say_how_to_give_them(tmp_path: Path) -> None:
    given = {
        "RETRY_QUEUE_URL": "https://sqs.eu-west-1.amazonaws.com/123456789012/q",
        "RETRY_DLQ_URL": "https://sqs.eu-west-1.amazonaws.com/123456789012/d",
        "AWS_REGION": "eu-west-1",
        **NO_CREDENTIALS,
    }

    run = run_cli(tmp_path, given, "redrive", "--dry-run")

    assert run.returncode == REFUSED
    assert "no AWS credentials found (the given queues need them)" in one_line_error(run.stderr)


def test_a_task_id_that_is_no_uuid_is_said_so_before_any_database(tmp_path: Path) -> None:
    run = run_cli(tmp_path, {"DATABASE_URL": "mysql://u@h/d"}, "status", "not-a-task")

    assert run.returncode == 2
    assert "'not-a-task' is not a task id (a UUID" in one_line_error(run.stderr)


def client_error(code: str, message: str = "no") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "SendMessageBatch")


@pytest.mark.parametrize(
    ("failure", "says"),
    [
        (client_error("ExpiredTokenException", "expired"), "refresh them (`aws sso login`"),
        (client_error("AccessDeniedException", "not allowed"), "need that permission"),
        (client_error("AWS.SimpleQueueService.NonExistentQueue"), "the queue does not exist"),
        (NoCredentialsError(), "no AWS credentials found"),
        (RuntimeError("something nobody foresaw"), "unexpected: run again with --debug"),
    ],
    ids=["expired-token", "access-denied", "no-queue", "no-credentials", "unforeseen"],
)
def test_every_failure_has_a_one_line_answer(failure: Exception, says: str) -> None:
    answer = explain(failure)

    assert says in answer.message
    assert "\n" not in answer.message


def test_serve_says_which_port_is_taken(tmp_path: Path) -> None:
    # GIVEN a port someone already listens on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        # WHEN the API is served on it (a database and queues of its own)
        run = run_cli(tmp_path, None, "serve", "--port", str(port))

    # THEN one line says so, and how to choose another
    assert run.returncode == 1
    line = one_line_error(run.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
    run_cli(tmp_path, None, "stop")


def test_sql_answers_with_postgresqls_own_refusal_of_a_statement(tmp_path: Path) -> None:
    # WHEN a person's statement names a table that does not exist (the local database)
    run = run_cli(tmp_path, None, "sql", "SELECT * FROM tutorial")

    # THEN PostgreSQL's own words are the answer, not a guess about the schema
    assert run.returncode == 1
    line = one_line_error(run.stderr)
    assert 'PostgreSQL refused the statement: relation "tutorial" does not exist' in line


def test_debug_may_follow_the_command(tmp_path: Path) -> None:
    given = {"DATABASE_URL": f"postgresql://u@127.0.0.1:{closed_port()}/d"}

    run = run_cli(tmp_path, given, "status", TASK_ID, "--debug")

    assert run.returncode == 1
    assert "Traceback" in run.stderr and "cannot connect to the database" in run.stderr
