"""The local runtime: the demo, serve over real HTTP, drain, redrive."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import Connection, Engine, text

from content_retry.database import build_engine
from content_retry.generators import TransientGenerationError
from content_retry.settings import Settings
from content_retry_local.aws import (
    ensure_background_moto,
    start_threaded_moto,
    stop_background_moto,
)
from content_retry_local.http_api import ApiRequestHandler, make_server
from content_retry_local.lambda_runtime import drain, invoke, queue_depth, redrive
from content_retry_local.seed import (
    SEED_ROADMAP_ID,
    ConceptSeed,
    insert_roadmap,
    seed_scenario,
    single_module_framework,
)
from content_retry_local.sessions import EngineSessions
from content_retry_local.template import create_queues
from tests.conftest import REPO_ROOT, Queues
from tests.support import CountingGenerator, worker_deps


def run_demo(
    cwd: Path, given: dict[str, str] | None = None, *arguments: str
) -> subprocess.CompletedProcess[str]:
    """``content-retry demo`` in a new process, with nothing configured but ``given``."""
    return run_cli(cwd, given, "demo", *arguments)


def cli_environment(given: dict[str, str] | None) -> dict[str, str]:
    """This process's environment with no database, AWS or queue configured but ``given``."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "DATABASE_URL", "RETRY_", "DB_"))
    }
    environment.update(given or {})
    return environment


def run_cli(
    cwd: Path, given: dict[str, str] | None, *arguments: str
) -> subprocess.CompletedProcess[str]:
    """``content-retry ARGUMENTS`` in a new process, with nothing configured but ``given``."""
    return subprocess.run(
        [sys.executable, "-m", "content_retry_local.cli", *arguments],
        cwd=cwd,
        env=cli_environment(given),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_demo_repairs_the_seed_and_can_run_twice(tmp_path: Path) -> None:
    # WHEN the README's main command runs on a machine with nothing configured, twice
    first = run_demo(tmp_path)
    second = run_demo(tmp_path)

    # THEN both runs end well, with the summary the README promises
    for run in (first, second):
        assert run.returncode == 0, run.stdout + run.stderr
        assert "retried_count=21" in run.stdout
        assert 'the old worker\'s rule (content_status == "failed"):  0' in run.stdout
        assert "DLQ depth: 0" in run.stdout
        assert (
            "LLM calls: 26 (21 for the 21 tutorials, 0 for the re-drive, 5 for the sweep)"
            in run.stdout
        )
        assert "end state: OK" in run.stdout
    # in a database of its own, apart from the one the other local commands share
    assert (tmp_path / ".local" / "demo" / "pgdata" / "PG_VERSION").exists()
    assert not (tmp_path / ".local" / "pgdata").exists()


def test_the_demo_runs_through_bedrocks_api_against_a_local_bedrock(tmp_path: Path) -> None:
    # WHEN the demo generates through the Converse API (tool use), served locally
    run = run_demo(tmp_path, None, "--llm-latency", "0.05")

    # THEN it repairs the seed the same way, and the task's usage holds real token counts
    assert run.returncode == 0, run.stdout + run.stderr
    assert "LLM: local Bedrock (0.05 s a call)" in run.stdout
    assert (
        "LLM calls: 26 (21 for the 21 tutorials, 0 for the re-drive, 5 for the sweep)" in run.stdout
    )
    usage = re.search(r"LLM usage: (\d+) calls, (\d+) input and (\d+) output tokens", run.stdout)
    assert usage is not None, run.stdout
    assert int(usage[1]) == 21 and int(usage[2]) > 0 and int(usage[3]) > 0
    assert "end state: OK" in run.stdout


def test_the_demo_refuses_a_latency_it_cannot_take(tmp_path: Path) -> None:
    run = run_demo(tmp_path, None, "--llm-latency", "soon")

    assert run.returncode == 2
    assert "'soon' is not a number of seconds" in run.stderr


@pytest.fixture
def served(queues: Queues) -> Iterator[tuple[str, str]]:
    """The HTTP API twice: without identity, and with the development header."""
    servers = [make_server(0, dev_identity=False), make_server(0, dev_identity=True)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    anonymous, dev = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    yield anonymous, dev
    for server in servers:
        server.shutdown()
        server.server_close()


def request(
    url: str, method: str = "GET", body: Any = None, user: str | None = None
) -> tuple[int, Any]:
    data = (
        body.encode()
        if isinstance(body, str)
        else None
        if body is None
        else json.dumps(body).encode()
    )
    headers = {"Content-Type": "application/json"}
    if user:
        headers["X-Dev-User"] = user
    call = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def test_serve_answers_real_http_with_the_contract(
    served: tuple[str, str], connection: Connection
) -> None:
    anonymous, dev = served
    seed_scenario(connection)
    connection.commit()
    retry = f"/roadmaps/{SEED_ROADMAP_ID}/retry"

    assert request(anonymous + retry, "POST", {"content_types": ["tutorial"]})[0] == 401
    assert request(dev + retry, "POST", {"content_types": ["tutorial"]})[0] == 401  # no header
    assert request(dev + retry, "POST", {"content_types": ["tutorial"]}, user="u-7")[0] == 404
    assert request(dev + retry, "POST", {"content_types": ["poem"]}, user="u-42")[0] == 422
    assert request(dev + retry, "POST", "not json", user="u-42")[0] == 400
    status, body = request(dev + retry, "POST", {"content_types": ["tutorial"]}, user="u-42")
    assert (status, body["retried_count"]) == (202, 21)
    status, task = request(f"{dev}/retry-tasks/{body['task_id']}", user="u-42")
    assert (status, task["counts"]["queued"]) == (200, 21)
    assert request(f"{anonymous}/retry-tasks/{body['task_id']}")[0] == 401
    assert request(f"{dev}/retry-tasks/{body['task_id']}", user="u-7")[0] == 404
    status, document = request(anonymous + "/openapi.json")
    assert status == 200
    assert set(document["paths"]) == {
        "/roadmaps/{roadmap_id}/retry",
        "/roadmaps/{roadmap_id}/retry-plan",
        "/retry-tasks/{task_id}",
    }


def queue_the_seed_with_c15_throttled(connection: Connection, load_event: Any) -> CountingGenerator:
    """The seed's 21 tutorials queued through detect; a generator whose LLM
    throttles c15's tutorial every time."""
    seed_scenario(connection)
    connection.commit()
    invoke("detect", load_event("api-retry.json"))
    generator = CountingGenerator()
    generator.failures[("c15", "tutorial")] = TransientGenerationError("ThrottlingException")
    return generator


def test_draining_a_real_queue_leaves_a_failed_record_to_its_visibility_timeout(
    connection: Connection, queues: Queues, db: Engine, load_event: Any
) -> None:
    # GIVEN 21 queued messages, one of which the LLM throttles
    generator = queue_the_seed_with_c15_throttled(connection, load_event)

    # WHEN the queue is drained as a real one (content-retry drain against AWS)
    report = drain(
        queues.sqs, queues.queue_url, deps=worker_deps(db, queues.sqs, generator), real_queue=True
    )

    # THEN the failed record was tried once and waits, in flight, as with Lambda:
    # not received again at once until its receives (and LLM calls) ran out
    assert (report.succeeded, report.failed) == (20, 1)
    assert generator.calls.count(("c15", "tutorial")) == 1
    assert queue_depth(queues.sqs, queues.queue_url) == 1
    assert queue_depth(queues.sqs, queues.dlq_url) == 0


def test_drain_dead_letters_a_record_that_keeps_failing_with_its_reason(
    connection: Connection, queues: Queues, db: Engine, load_event: Any
) -> None:
    # GIVEN 21 queued messages, one of which the LLM never manages
    generator = queue_the_seed_with_c15_throttled(connection, load_event)

    # WHEN the local poller drains the queue through the generate handler
    report = drain(queues.sqs, queues.queue_url, deps=worker_deps(db, queues.sqs, generator))

    # THEN the other 20 were saved and deleted; the failing one was received
    # maxReceiveCount (5) times, failed back 4 times, and on its last delivery
    # the worker dead-lettered it with its reason (SQS's redrive would have none)
    assert report.succeeded == 21
    assert report.failed == 4
    assert generator.calls.count(("c15", "tutorial")) == 5
    assert queue_depth(queues.sqs, queues.queue_url) == 0
    dead = queues.receive_all(queues.dlq_url)
    assert [json.loads(m["Body"])["concept"]["concept_id"] for m in dead] == ["c15"]
    attributes = dead[0]["MessageAttributes"]
    assert attributes["reason"]["StringValue"] == "retries_exhausted"
    assert "ThrottlingException" in attributes["error"]["StringValue"]
    with db.connect() as connection:
        saved = connection.execute(
            text("SELECT count(*) FROM tutorials WHERE roadmap_id = :r AND is_latest"),
            {"r": SEED_ROADMAP_ID},
        ).scalar_one()
    assert saved == 30


def test_redrive_dry_run_changes_nothing_and_redrive_moves_everything(queues: Queues) -> None:
    for number in range(3):
        queues.sqs.send_message(
            QueueUrl=queues.dlq_url,
            MessageBody=json.dumps({"n": number}),
            MessageAttributes={"reason": {"DataType": "String", "StringValue": "save_failed"}},
        )

    dry = redrive(queues.sqs, queues.dlq_url, queues.queue_url, dry_run=True)
    assert (dry.moved, dry.dry_run) == (3, True)
    assert queue_depth(queues.sqs, queues.dlq_url) == 3
    assert queue_depth(queues.sqs, queues.queue_url) == 0
    received = queues.receive_all(queues.dlq_url)
    assert {m["Attributes"]["ApproximateReceiveCount"] for m in received} == {"1"}

    for message in received:
        queues.sqs.send_message(
            QueueUrl=queues.dlq_url,
            MessageBody=message["Body"],
            MessageAttributes={"reason": {"DataType": "String", "StringValue": "save_failed"}},
        )
    moved = redrive(queues.sqs, queues.dlq_url, queues.queue_url, use_move_task=False)
    assert moved.moved == 3
    assert queue_depth(queues.sqs, queues.dlq_url) == 0
    bodies = sorted(m["Body"] for m in queues.receive_all())
    assert bodies == sorted(json.dumps({"n": n}) for n in range(3))


def test_the_cli_refuses_a_bad_event_file_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "event.json"
    bad.write_text("{not json")

    run = subprocess.run(
        [sys.executable, "-m", "content_retry_local.cli", "invoke", "detect", "--event", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )

    assert run.returncode == 2
    assert "cannot read the event" in run.stderr


@pytest.fixture
def real_looking_targets(
    db: Engine, database_url: str
) -> Iterator[tuple[dict[str, str], Any, str, str]]:
    """A database and queues the demo did not start: the test database with a
    roadmap under the seed's id, and a moto server whose queues hold messages."""
    endpoint, server = start_threaded_moto()
    sqs = boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    queue_url, dlq_url = create_queues(sqs, prefix="someone-elses")
    sqs.send_message(QueueUrl=queue_url, MessageBody='{"waiting": true}')
    sqs.send_message(QueueUrl=dlq_url, MessageBody='{"generated": "paid for"}')
    with db.begin() as connection:
        insert_roadmap(
            connection,
            SEED_ROADMAP_ID,
            "someone",
            single_module_framework([ConceptSeed("x", "X", "Theirs.")]),
        )
    variables = {
        "DATABASE_URL": database_url,
        "AWS_ENDPOINT_URL": endpoint,
        "RETRY_QUEUE_URL": queue_url,
        "RETRY_DLQ_URL": dlq_url,
    }
    yield variables, sqs, queue_url, dlq_url
    server.stop()


@pytest.mark.parametrize(
    "given",
    [
        ("DATABASE_URL", "AWS_ENDPOINT_URL", "RETRY_QUEUE_URL", "RETRY_DLQ_URL"),
        ("DATABASE_URL",),
        ("RETRY_QUEUE_URL", "RETRY_DLQ_URL", "AWS_ENDPOINT_URL"),
        ("AWS_ENDPOINT_URL",),
    ],
    ids=["all", "database", "queues", "endpoint"],
)
def test_the_demo_refuses_what_it_did_not_start_and_touches_nothing(
    real_looking_targets: tuple[dict[str, str], Any, str, str],
    db: Engine,
    tmp_path: Path,
    given: tuple[str, ...],
) -> None:
    # GIVEN someone else's session open on the database, and messages on their queues
    variables, sqs, queue_url, dlq_url = real_looking_targets
    with db.connect() as bystander:
        bystander_pid = bystander.execute(text("SELECT pg_backend_pid()")).scalar_one()

        # WHEN the demo is started with the variables pointing at them
        run = run_demo(tmp_path, {name: variables[name] for name in given})

        # THEN it exits 2, naming what it refused and why, before touching anything
        assert run.returncode == 2, run.stdout + run.stderr
        for name in given:
            assert name in run.stderr
        assert "embedded PostgreSQL" in run.stderr
        assert not (tmp_path / ".local").exists()
        # the bystander's session is alive and still the same one
        assert bystander.execute(text("SELECT pg_backend_pid()")).scalar_one() == bystander_pid
    for url, body in ((queue_url, '{"waiting": true}'), (dlq_url, '{"generated": "paid for"}')):
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        assert [message["Body"] for message in messages] == [body]
    with db.connect() as connection:
        owner = connection.execute(
            text("SELECT user_id FROM roadmap_metadata WHERE roadmap_id = :r"),
            {"r": SEED_ROADMAP_ID},
        ).scalar_one()
    assert owner == "someone"


@pytest.mark.parametrize(
    ("command", "given"),
    [
        (("drain",), ("AWS_ENDPOINT_URL", "RETRY_QUEUE_URL", "RETRY_DLQ_URL")),
        (("serve",), ("AWS_ENDPOINT_URL", "RETRY_QUEUE_URL", "RETRY_DLQ_URL")),
        (("invoke", "detect", "--event", "events/api-retry.json"), ("DATABASE_URL",)),
        (("drain",), ("DATABASE_URL",)),
    ],
    ids=["drain-queues-only", "serve-queues-only", "invoke-database-only", "drain-database-only"],
)
def test_commands_refuse_a_database_and_queues_of_different_deployments(
    real_looking_targets: tuple[dict[str, str], Any, str, str],
    db: Engine,
    tmp_path: Path,
    command: tuple[str, ...],
    given: tuple[str, ...],
) -> None:
    # GIVEN only half of a deployment named: its queues, or its database
    variables, sqs, queue_url, dlq_url = real_looking_targets
    events = tmp_path / "events"
    events.mkdir()
    (events / "api-retry.json").write_bytes((REPO_ROOT / "events" / "api-retry.json").read_bytes())

    # WHEN an operator command is run with it
    run = run_cli(tmp_path, {name: variables[name] for name in given}, *command)

    # THEN it exits 2 naming what is missing, before starting or touching anything
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Give the" in run.stderr and given[0] in run.stderr
    assert not (tmp_path / ".local").exists()
    for url, body in ((queue_url, '{"waiting": true}'), (dlq_url, '{"generated": "paid for"}')):
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        assert [message["Body"] for message in messages] == [body]
    with db.connect() as connection:
        tasks = connection.execute(text("SELECT count(*) FROM retry_tasks")).scalar_one()
    assert tasks == 0


def test_redrive_needs_no_database(
    real_looking_targets: tuple[dict[str, str], Any, str, str], tmp_path: Path
) -> None:
    # GIVEN only the queues (a re-drive against AWS moves messages, nothing else)
    variables, sqs, _, dlq_url = real_looking_targets
    given = {name: variables[name] for name in ("AWS_ENDPOINT_URL", "RETRY_QUEUE_URL")}
    given |= {
        "RETRY_DLQ_URL": variables["RETRY_DLQ_URL"],
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_REGION": "us-east-1",
    }

    depth = queue_depth(sqs, dlq_url)

    run = run_cli(tmp_path, given, "redrive", "--dry-run")

    assert run.returncode == 0, run.stdout + run.stderr
    assert f"dry run: {depth} message(s) would move back" in run.stdout
    assert depth >= 1 and queue_depth(sqs, dlq_url) == depth
    assert not (tmp_path / ".local").exists()  # no embedded PostgreSQL started


def test_the_staged_fault_ends_only_the_sessions_of_its_own_engine(
    db: Engine, database_url: str
) -> None:
    # GIVEN the worker's engine, with its connection open, and a bystander's session
    worker = build_engine(Settings(DATABASE_URL=database_url))
    with EngineSessions(worker) as sessions, db.connect() as bystander:
        with worker.connect() as connection:
            worker_pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        bystander_pid = bystander.execute(text("SELECT pg_backend_pid()")).scalar_one()

        # WHEN the fault is staged
        ended = sessions.terminate()

        # THEN the worker's session is gone and the bystander's is not
        assert ended == 1
        assert sessions.pids == {worker_pid}
        assert bystander.execute(text("SELECT pg_backend_pid()")).scalar_one() == bystander_pid
        with db.connect() as connection:
            alive = set(
                connection.execute(text("SELECT pid FROM pg_stat_activity")).scalars().all()
            )
        assert worker_pid not in alive
        assert bystander_pid in alive
    worker.dispose()


def test_serve_answers_others_while_one_client_stalls_and_times_the_stall_out(
    queues: Queues, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the local API, whose clients get 1 s to send their request
    monkeypatch.setattr(ApiRequestHandler, "timeout", 1)
    server = make_server(0, dev_identity=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        # WHEN one client sends its headers and half its body, then stalls
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(
            b"POST /roadmaps/r/retry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\nX-Dev-User: u-1\r\n\r\n{"content'
        )
        # THEN another client is answered at once...
        started = time.monotonic()
        status, _ = request(f"http://127.0.0.1:{port}/openapi.json")
        assert status == 200
        assert time.monotonic() - started < 1
        # ...and the stalled one is cut off once its time is up
        stalled.settimeout(5)
        assert stalled.recv(1024) == b""
        stalled.close()
    finally:
        server.shutdown()
        server.server_close()


def test_stop_leaves_alone_a_process_that_took_the_moto_servers_pid(tmp_path: Path) -> None:
    # GIVEN a state file that outlived its moto server (a reboot), its pid now another's
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / "moto.json").write_text(json.dumps({"pid": bystander.pid, "port": 5999}))
    try:
        # WHEN the local moto server is stopped
        stopped = stop_background_moto(tmp_path)

        # THEN nothing was signalled, and the stale file is gone
        assert stopped is False
        time.sleep(0.2)
        assert bystander.poll() is None
        assert not (tmp_path / "moto.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_the_background_moto_server_is_shared_then_stopped(tmp_path: Path) -> None:
    # GIVEN the server the local commands share, asked for twice
    endpoint = ensure_background_moto(tmp_path)
    pid = json.loads((tmp_path / "moto.json").read_text())["pid"]
    assert ensure_background_moto(tmp_path) == endpoint

    # WHEN it is stopped
    stopped = stop_background_moto(tmp_path)

    # THEN it was that server, and it is gone (it answers no more; as this
    # process's child it stays a zombie until reaped, so its pid says nothing)
    assert stopped is True
    port = int(endpoint.rsplit(":", 1)[1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"moto's server (pid {pid}) still answers on port {port}")
