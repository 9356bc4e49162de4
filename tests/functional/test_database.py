"""Database access: the contract's tables, the engine's modes, reconnecting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import boto3
import pytest
from moto import mock_aws
from sqlalchemy import Connection, make_url, text

from content_retry.content_types import STORAGE, ContentType
from content_retry.database import build_engine
from content_retry.database.engine import (
    iam_connect_params,
    normalise_database_url,
    secret_connect_params,
)
from content_retry.repositories.content_versions import save_statement
from content_retry.settings import Settings, SettingsError
from content_retry_local.explain import explain
from tests.conftest import REPO_ROOT


def _socket_dir(database_url: str) -> str:
    unix_sock = make_url(database_url).query.get("unix_sock")
    if not isinstance(unix_sock, str):
        pytest.skip("needs the embedded (Unix socket) server to connect without TLS")
    return unix_sock.rsplit("/", 1)[0]


def test_the_contract_insert_naming_only_contract_columns_works(connection: Connection) -> None:
    connection.execute(
        text(
            "INSERT INTO roadmap_metadata (roadmap_id, user_id, framework_data) VALUES ('r', 'u', '{}')"
        )
    )
    connection.execute(
        text(
            "INSERT INTO quizzes (roadmap_id, concept_id, content_status) VALUES ('r', 'c', 'failed')"
        )
    )
    row = connection.execute(text("SELECT content_version, is_latest, id FROM quizzes")).one()
    assert row.content_version == 1 and row.is_latest is True and row.id


def test_one_latest_row_per_concept_is_enforced(connection: Connection) -> None:
    connection.execute(
        text(
            "INSERT INTO roadmap_metadata (roadmap_id, user_id, framework_data) VALUES ('r', 'u', '{}')"
        )
    )
    insert = text(
        "INSERT INTO tutorials (roadmap_id, concept_id, content_status) VALUES ('r', 'c', 'completed')"
    )
    connection.execute(insert)
    with pytest.raises(Exception, match="tutorials_one_latest_per_concept"):
        connection.execute(insert)


@pytest.mark.parametrize("content_type", list(ContentType))
def test_the_save_numbers_versions_from_an_index_not_a_table_scan(
    connection: Connection, content_type: ContentType
) -> None:
    # The save reads the concept's highest version over all its rows, history
    # included; on a platform table of millions of rows a scan there would cost
    # every save. Scans are priced out, so a missing index shows as a Seq Scan.
    connection.execute(text("SET LOCAL enable_seqscan = off"))
    params = {
        "task": "00000000-0000-0000-0000-000000000001",
        "concept": "c",
        "item_type": content_type.value,
        "roadmap": "r",
        "owner": "u",
        "version_title": "t",
        "payload": "{}",
        "added_llm_calls": 0,
        "added_input_tokens": 0,
        "added_output_tokens": 0,
    }
    plan = explain(connection, save_statement(content_type), params)

    table = STORAGE[content_type].table
    assert f"Seq Scan on {table}" not in plan, plan
    assert f"{table}_versions_per_concept" in plan, plan


def test_engine_holds_one_connection_and_reconnects_after_it_is_killed(database_url: str) -> None:
    # GIVEN the engine a Lambda container uses, with its one connection open
    engine = build_engine(Settings(DATABASE_URL=database_url))
    pids = set()
    for _ in range(3):
        with engine.connect() as connection:
            pids.add(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
    assert len(pids) == 1  # one connection, reused by every use
    first_pid = pids.pop()

    # WHEN the server drops that connection (a proxy idle timeout, a failover)
    killer = build_engine(Settings(DATABASE_URL=database_url))
    with killer.begin() as connection:
        assert connection.execute(
            text("SELECT pg_terminate_backend(:pid)"), {"pid": first_pid}
        ).scalar_one()
    killer.dispose()

    # THEN the next use pings, replaces it, and succeeds
    with engine.connect() as connection:
        second_pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    assert second_pid != first_pid
    engine.dispose()


def test_iam_mode_generates_a_token_for_every_new_connection(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN IAM authentication to a proxy; the test reaches the embedded server
    # (which trusts any password) over its socket instead of TLS to the proxy
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    socket = f"{_socket_dir(database_url)}/.s.PGSQL.5432"
    settings = Settings(
        DB_AUTH="iam", DB_HOST="proxy.local", DB_NAME="postgres", DB_USER="postgres"
    )
    rds = boto3.client("rds", region_name="us-east-1")
    passwords: list[str] = []

    def resolve() -> dict[str, Any]:
        params = iam_connect_params(settings, rds)
        passwords.append(params["password"])
        for tcp_only in ("host", "port", "ssl_context"):
            del params[tcp_only]
        return {**params, "unix_sock": socket}

    engine = build_engine(settings, connect_params=resolve)

    # WHEN it connects, loses the connection, and connects again
    with engine.connect() as connection:
        assert connection.execute(text("SELECT current_user")).scalar_one() == "postgres"
    engine.dispose()
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    engine.dispose()

    # THEN each connection got its own freshly generated token
    assert len(passwords) == 2
    assert all("Action=connect" in token and "DBUser=postgres" in token for token in passwords)


def test_iam_mode_over_tcp_requires_tls() -> None:
    settings = Settings(DB_AUTH="iam", DB_HOST="proxy.example", DB_NAME="app", DB_USER="retry")

    class Rds:
        def generate_db_auth_token(self, **kwargs: Any) -> str:
            return f"token-for-{kwargs['DBUsername']}@{kwargs['DBHostname']}:{kwargs['Port']}"

    params = iam_connect_params(settings, Rds())

    assert params["ssl_context"] is not None
    assert params["password"] == "token-for-retry@proxy.example:5432"
    assert (params["host"], params["database"], params["user"]) == ("proxy.example", "app", "retry")


@mock_aws
def test_secret_mode_reads_credentials_from_secrets_manager(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the secret RDS keeps for the database, in (moto's) Secrets Manager
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    arn = secrets.create_secret(
        Name="db",
        SecretString=json.dumps({"username": "postgres", "password": "pw", "dbname": "postgres"}),
    )["ARN"]
    settings = Settings(
        DB_AUTH="secret",
        DB_HOST=_socket_dir(database_url),
        DB_SECRET_ARN=arn,
        DB_NAME="postgres",
        DB_USER="postgres",
    )

    # WHEN the engine connects
    engine = build_engine(settings, connect_params=lambda: secret_connect_params(settings, secrets))
    with engine.connect() as connection:
        # THEN it used the secret's credentials and reached the database
        assert connection.execute(text("SELECT 1")).scalar_one() == 1
    engine.dispose()
    assert secret_connect_params(settings, secrets)["password"] == "pw"


@mock_aws
def test_a_secret_that_is_not_rds_json_is_a_clear_error() -> None:
    secrets = boto3.client("secretsmanager", region_name="us-east-1")
    arn = secrets.create_secret(Name="db", SecretString="hunter2")["ARN"]
    settings = Settings(DB_AUTH="secret", DB_HOST="h", DB_NAME="n", DB_USER="u", DB_SECRET_ARN=arn)

    with pytest.raises(SettingsError, match="'username' and 'password'"):
        secret_connect_params(settings, secrets)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@localhost:5433/db", "postgresql+pg8000://u@localhost:5433/db"),
        (
            "postgres://u@/db?host=/tmp/sock",
            "postgresql+pg8000://u@/db?unix_sock=/tmp/sock/.s.PGSQL.5432",
        ),
        ("postgresql+pg8000://u@h/db", "postgresql+pg8000://u@h/db"),
    ],
)
def test_database_urls_are_normalised_for_pg8000(given: str, expected: str) -> None:
    assert normalise_database_url(given) == make_url(expected)


def test_a_non_postgres_database_url_is_rejected() -> None:
    with pytest.raises(SettingsError, match="postgresql://"):
        normalise_database_url("mysql://u@h/db")


def test_importing_the_handlers_opens_no_connection_and_creates_no_client() -> None:
    # GIVEN a process whose database and AWS endpoints do not exist
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DATABASE_", "DB_"))},
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/nowhere",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_REGION": "us-east-1",
    }
    probe = (
        "import functions.detect.app, functions.generate.app\n"
        "from content_retry.database.engine import get_engine\n"
        "from content_retry.aws import client, bedrock_runtime_client\n"
        "assert get_engine.cache_info().currsize == 0, 'engine created at import'\n"
        "assert client.cache_info().currsize == 0, 'client created at import'\n"
        "assert bedrock_runtime_client.cache_info().currsize == 0\n"
        "print('clean import')\n"
    )

    # WHEN both handler modules are imported (what SnapStart snapshots)
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # THEN nothing was created: import succeeds without a reachable database or AWS
    assert run.returncode == 0, run.stderr
    assert "clean import" in run.stdout
