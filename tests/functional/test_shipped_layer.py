"""The handlers as Lambda runs them: from what `sam build` ships, on Python 3.12.

The layer is built by its deployed recipe (layers/common/Makefile, x86_64 so
this machine can run it), the tree is dated 1980 and made read-only as
Lambda's code folders are, and each handler runs in ``python3.12 -I -S -B``
with only the function's folder, the layer and the standard library on
``sys.path``, against the test PostgreSQL and a moto server.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from packaging.requirements import Requirement
from sqlalchemy import Engine, text

from content_retry_local.aws import start_threaded_moto
from content_retry_local.lambda_runtime import sqs_record
from content_retry_local.seed import SEED_ROADMAP_ID, seed_scenario
from content_retry_local.shipped import (
    ShippedTree,
    build_shipped_tree,
    find_python312,
    freeze,
    lambda_environment,
    run_handler,
    thaw,
)
from content_retry_local.template import create_queues
from tests.conftest import REPO_ROOT

PYTHON312 = find_python312()

pytestmark = pytest.mark.skipif(
    PYTHON312 is None,
    reason="NO PYTHON 3.12 ON THIS MACHINE: the handlers were NOT proven on Lambda's "
    "runtime (install python3.12, or set PYTHON312)",
)

# The flags of a .pyc compiled with --invalidation-mode unchecked-hash (PEP 552):
# hash-based (bit 0), source not checked (bit 1 clear).
UNCHECKED_HASH = 0b01


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedTree]:
    assert PYTHON312 is not None
    tree = build_shipped_tree(tmp_path_factory.mktemp("shipped"), python312=PYTHON312)
    freeze(tree.root)
    yield tree
    thaw(tree.root)


@pytest.fixture
def moto_queues() -> Iterator[tuple[str, Any, str, str]]:
    """A moto server (the handlers run in another process), with the template's queues."""
    endpoint, server = start_threaded_moto()
    sqs = boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    queue_url, dlq_url = create_queues(sqs)
    yield endpoint, sqs, queue_url, dlq_url
    server.stop()


@pytest.fixture
def xray_daemon() -> Iterator[socket.socket]:
    """Where the handlers' X-Ray SDK sends its segments (UDP), as Lambda's daemon receives them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as daemon:
        daemon.bind(("127.0.0.1", 0))
        daemon.settimeout(0.5)
        yield daemon


def received_segments(daemon: socket.socket) -> list[dict[str, Any]]:
    """Every segment the daemon received (each datagram: a header line, then the segment)."""
    segments: list[dict[str, Any]] = []
    while True:
        try:
            datagram = daemon.recv(65536)
        except TimeoutError:
            return segments
        segments.append(json.loads(datagram.decode().split("\n", 1)[1]))


def function_environment(
    function: str,
    tree: ShippedTree,
    database_url: str,
    endpoint: str,
    queue: str,
    dlq: str,
    daemon: str,
) -> dict[str, str]:
    return lambda_environment(
        function,
        tree,
        DATABASE_URL=database_url,
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local",
        RETRY_QUEUE_URL=queue,
        RETRY_DLQ_URL=dlq,
        CONTENT_GENERATOR="template",
        POWERTOOLS_SERVICE_NAME="content-retry",
        POWERTOOLS_METRICS_NAMESPACE="ContentRetry",
        # Lambda's X-Ray facade: a sampled trace, its segments sent to the test's daemon.
        _X_AMZN_TRACE_ID="Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
        AWS_XRAY_DAEMON_ADDRESS=daemon,
        AWS_XRAY_CONTEXT_MISSING="IGNORE_ERROR",
    )


def test_both_handlers_run_from_the_shipped_tree_alone(
    shipped: ShippedTree,
    moto_queues: tuple[str, Any, str, str],
    db: Engine,
    database_url: str,
    tmp_path: Path,
    xray_daemon: socket.socket,
) -> None:
    endpoint, sqs, queue_url, dlq_url = moto_queues
    daemon = f"127.0.0.1:{xray_daemon.getsockname()[1]}"
    with db.begin() as connection:
        seed_scenario(connection)

    def environment(function: str) -> dict[str, str]:
        return function_environment(
            function, shipped, database_url, endpoint, queue_url, dlq_url, daemon
        )

    # WHEN detect runs on the direct-invoke event, as Lambda would run it
    detect = run_handler(
        shipped, "detect", REPO_ROOT / "events/direct-invoke.json", environment("detect")
    )

    # THEN it plans the seed's 21 lost tutorials, and loaded nothing from outside the tree
    assert detect.result["retried_count"] == 21, detect.output
    assert detect.result["task_id"]
    assert detect.foreign_modules == []

    # WHEN generate runs on one batch of what detect queued
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=5)["Messages"]
    event_path = tmp_path / "batch.json"
    event_path.write_text(
        json.dumps({"Records": [sqs_record(m["Body"], m["MessageId"]) for m in messages]})
    )
    generate = run_handler(shipped, "generate", event_path, environment("generate"))

    # THEN every record is saved, and nothing came from outside the tree either
    assert generate.result == {"batchItemFailures": []}, generate.output
    assert generate.foreign_modules == []
    with db.connect() as connection:
        saved = connection.execute(
            text(
                "SELECT count(*) FROM retry_items WHERE task_id = CAST(:task AS uuid) "
                "AND status = 'succeeded'"
            ),
            {"task": detect.result["task_id"]},
        ).scalar_one()
        completed = connection.execute(
            text(
                "SELECT count(*) FROM tutorials WHERE roadmap_id = :r AND is_latest "
                "AND content_status = 'completed'"
            ),
            {"r": SEED_ROADMAP_ID},
        ).scalar_one()
    assert saved == len(messages) == 5
    assert completed == 10 + 5

    # AND every module the layer gave them came precompiled, valid whatever the files' dates
    for module_file in detect.layer_modules + generate.layer_modules:
        if not module_file.endswith(".py"):
            continue  # extension modules
        source = Path(module_file)
        bytecode = source.parent / "__pycache__" / f"{source.stem}.cpython-312.pyc"
        assert bytecode.exists(), f"no bytecode shipped for {module_file}"
        flags = int.from_bytes(bytecode.read_bytes()[4:8], "little")
        assert flags == UNCHECKED_HASH, f"{bytecode} is not unchecked-hash bytecode"

    # AND X-Ray got the judge, each save and each LLM call as subsegments, annotated
    # to be found by, with no response and none of the content in any segment
    segments = received_segments(xray_daemon)
    named: dict[str, list[dict[str, Any]]] = {}
    for segment in segments:
        named.setdefault(segment["name"], []).append(segment)
    assert {"## lambda_handler", "## judge", "## save", "## llm_call"} <= set(named), set(named)
    assert named["## judge"][0]["annotations"] == {"roadmap_id": SEED_ROADMAP_ID}
    assert len(named["## llm_call"]) == len(named["## save"]) == 5
    for call in named["## llm_call"]:
        assert call["annotations"]["task_id"] == detect.result["task_id"]
        assert call["annotations"]["content_type"] == "tutorial"
    everything = json.dumps(segments)
    assert "handler response" not in everything
    assert "## What it is" not in everything  # a tutorial's text
    for body in (json.loads(m["Body"]) for m in messages):
        assert body["concept"]["name"] not in everything


def test_the_layer_holds_the_runtime_and_exactly_the_locked_dependencies(
    shipped: ShippedTree,
) -> None:
    # GIVEN the lock
    lock = (REPO_ROOT / "layers/common/requirements.lock").read_text().splitlines()
    locked = {
        Requirement(line.split()[0]).name.lower().replace("-", "_"): line.split("==")[1].split()[0]
        for line in lock
        if line and line[0].isalpha()
    }

    # WHEN the shipped layer's installed distributions are read
    installed = {
        path.name.removesuffix(".dist-info").rsplit("-", 1)[0].lower(): path.name.removesuffix(
            ".dist-info"
        ).rsplit("-", 1)[1]
        for path in shipped.layer.glob("*.dist-info")
    }

    # THEN they are the lock's, version for version, and no local tooling is shipped
    assert installed == locked
    top_level = {path.name for path in shipped.layer.iterdir()}
    assert "content_retry" in top_level
    for local_only in ("content_retry_local", "moto", "pgserver", "yaml", "pytest"):
        assert local_only not in top_level
    assert not list((shipped.layer / "content_retry").rglob("*.lock"))
