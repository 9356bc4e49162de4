"""The local runtime: the demo, serve over real HTTP, drain, redrive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from content_retry.generators import TransientGenerationError, use_generator
from content_retry.local.http_api import make_server
from content_retry.local.lambda_runtime import drain, invoke, queue_depth, redrive
from content_retry.local.seed import SEED_ROADMAP_ID, seed_scenario
from tests.conftest import REPO_ROOT, Queues
from tests.functional.test_generate import CountingGenerator


def run_demo(cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "DATABASE_URL", "RETRY_", "DB_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "content_retry.cli", "demo"],
        cwd=cwd,
        env=environment,
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
    assert (tmp_path / ".local" / "pgdata" / "PG_VERSION").exists()


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
    served: tuple[str, str], session: Session
) -> None:
    anonymous, dev = served
    seed_scenario(session)
    session.commit()
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
    assert set(document["paths"]) == {"/roadmaps/{roadmap_id}/retry", "/retry-tasks/{task_id}"}


def test_drain_leaves_a_failing_record_to_the_redrive_policy(
    session: Session, queues: Queues, db: Engine, load_event: Any
) -> None:
    # GIVEN 21 queued messages, one of which the LLM never manages
    seed_scenario(session)
    session.commit()
    invoke("detect", load_event("api-retry.json"))
    generator = CountingGenerator()
    generator.failures[("c15", "tutorial")] = TransientGenerationError("ThrottlingException")
    use_generator(generator)
    try:
        # WHEN the local poller drains the queue
        report = drain(queues.sqs, queues.queue_url)
    finally:
        use_generator(None)

    # THEN the other 20 were saved and deleted; the failing one was received
    # maxReceiveCount (5) times, then SQS moved it to the DLQ
    assert report.succeeded == 20
    assert report.failed == 5
    assert generator.calls.count(("c15", "tutorial")) == 5
    assert queue_depth(queues.sqs, queues.queue_url) == 0
    dead = queues.receive_all(queues.dlq_url)
    assert [json.loads(m["Body"])["concept"]["concept_id"] for m in dead] == ["c15"]
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
        [sys.executable, "-m", "content_retry.cli", "invoke", "detect", "--event", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )

    assert run.returncode == 2
    assert "cannot read the event" in run.stderr
