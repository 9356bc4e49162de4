"""Connections under load: PgBouncer (the local RDS Proxy) keeps them bounded.

50 concurrent generate workers, each with its own engine as each Lambda
container has, save through PgBouncer (transaction pooling, a pool of 10) in
front of a PostgreSQL this test starts with max_connections = 30. Then the
same load goes straight to PostgreSQL, to show the failure the pool prevents.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pg8000.native
import pytest
from moto import mock_aws
from sqlalchemy import make_url

from content_retry.database import build_engine
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import Preferences, messages_for_plan
from content_retry.plan.build import build_retry_plan
from content_retry.repositories import tasks
from content_retry.settings import Settings
from content_retry.worker import WorkerDependencies, handle_retry_batch
from content_retry_local.lambda_runtime import sqs_record
from content_retry_local.pgbouncer import PgBouncer, find_pgbouncer
from content_retry_local.postgres import start_embedded_postgres
from content_retry_local.schema import upgrade
from content_retry_local.seed import ConceptSeed, insert_roadmap, single_module_framework
from content_retry_local.template import create_queues

WORKERS = 50
POOL_SIZE = 10
MAX_CONNECTIONS = 30
CONCEPTS_PER_WORKER = 6
BATCH = 3

pytestmark = pytest.mark.skipif(
    find_pgbouncer() is None, reason="needs pgbouncer (Debian package; .ci/run installs it)"
)


@dataclass
class Server:
    url: str
    socket_dir: str
    port: int


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    """A PostgreSQL of this test's own, with max_connections lowered to 30."""
    url = start_embedded_postgres(
        tmp_path_factory.mktemp("limited") / "data",
        delete_on_exit=True,
        max_connections=MAX_CONNECTIONS,
    )
    engine = build_engine(Settings(DATABASE_URL=url))
    upgrade(engine)
    engine.dispose()
    unix_sock = str(make_url(url).query["unix_sock"])
    socket_dir, _, name = unix_sock.rpartition("/")
    return Server(url=url, socket_dir=socket_dir, port=int(name.rsplit(".", 1)[1]))


class PeakConnections:
    """Samples the server's client backends (less its own) every 2 ms."""

    def __init__(self, unix_sock: str) -> None:
        self.unix_sock = unix_sock
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        connection = pg8000.native.Connection(user="postgres", unix_sock=self.unix_sock)
        while not self._stop.is_set():
            ((count,),) = connection.run(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
            self.peak = max(self.peak, count)
            time.sleep(0.002)
        connection.close()

    def __enter__(self) -> PeakConnections:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def prepare_work(server: Server, tag: str) -> list[list[dict[str, Any]]]:
    """Per worker: its own roadmap, planned and claimed, as SQS events."""
    engine = build_engine(Settings(DATABASE_URL=server.url))
    work = []
    for number in range(WORKERS):
        roadmap_id = f"{tag}-{number}"
        concepts = [ConceptSeed(f"c{n}", f"Concept {n}", "d") for n in range(CONCEPTS_PER_WORKER)]
        with engine.begin() as connection:
            insert_roadmap(connection, roadmap_id, f"u-{number}", single_module_framework(concepts))
        with engine.begin() as connection:
            plan = build_retry_plan(connection, roadmap_id, ["tutorial"])
            task_id = tasks.create_task(connection, plan, trigger="invoke", preferences={})
        bodies = [m.to_body() for m in messages_for_plan(task_id, plan, Preferences())]
        work.append(
            [
                {
                    "Records": [
                        sqs_record(body, f"{roadmap_id}-{start + n}")
                        for n, body in enumerate(bodies[start : start + BATCH])
                    ]
                }
                for start in range(0, len(bodies), BATCH)
            ]
        )
    engine.dispose()
    return work


@dataclass
class LoadResult:
    failed_records: int
    errors: list[str]
    peak_connections: int
    seconds: float


def run_load(
    url: str, work: list[list[dict[str, Any]]], unix_sock: str, dlq_url: str
) -> LoadResult:
    """Every worker at once, each with its own one-connection engine."""
    settings = Settings(DATABASE_URL=url, RETRY_DLQ_URL=dlq_url)
    generator = TemplateGenerator()
    sqs = boto3.client("sqs", region_name="us-east-1")
    failed: list[int] = []
    errors: list[str] = []
    start = threading.Barrier(WORKERS + 1)

    def worker(events: list[dict[str, Any]]) -> None:
        engine = build_engine(Settings(DATABASE_URL=url))
        deps = WorkerDependencies(engine=engine, sqs=sqs, settings=settings, generator=generator)
        start.wait()
        try:
            for event in events:
                response = handle_retry_batch(event, None, deps)
                failed.append(len(response["batchItemFailures"]))
        except Exception as exc:  # reported, not raised in a thread
            errors.append(repr(exc))
        finally:
            engine.dispose()

    threads = [threading.Thread(target=worker, args=(events,)) for events in work]
    with PeakConnections(unix_sock) as sampler:
        for thread in threads:
            thread.start()
        began = time.perf_counter()
        start.wait()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - began
    return LoadResult(sum(failed), errors, sampler.peak, seconds)


@pytest.fixture
def dlq() -> Iterator[str]:
    with mock_aws():
        _, dlq_url = create_queues(boto3.client("sqs", region_name="us-east-1"), prefix="load")
        yield dlq_url


def test_fifty_workers_through_pgbouncer_save_everything_within_the_pool(
    limited_server: Server, dlq: str, tmp_path: Path
) -> None:
    unix_sock = f"{limited_server.socket_dir}/.s.PGSQL.{limited_server.port}"
    with PgBouncer(
        limited_server.socket_dir, limited_server.port, ["postgres"], pool_size=POOL_SIZE
    ) as pool:
        # GIVEN 50 workers' worth of planned items
        work = prepare_work(limited_server, "pooled")

        # WHEN all 50 save at once through the pool
        pooled = run_load(pool.url("postgres"), work, unix_sock, dlq)

    # THEN nothing failed, and the server never saw more than the pool
    print(
        f"\nthrough PgBouncer: {WORKERS} workers, {WORKERS * CONCEPTS_PER_WORKER} items, "
        f"failed records {pooled.failed_records}, peak server connections "
        f"{pooled.peak_connections} (pool {POOL_SIZE}), {pooled.seconds:.1f} s"
    )
    assert pooled.errors == []
    assert pooled.failed_records == 0
    assert 0 < pooled.peak_connections <= POOL_SIZE

    # AND the same load straight to PostgreSQL takes more server connections than
    # the pool ever gave out: the pool, not the load, is what bounded them (how
    # many records collide with max_connections depends on timing: reported)
    direct = run_load(limited_server.url, prepare_work(limited_server, "direct"), unix_sock, dlq)
    print(
        f"straight to PostgreSQL (max_connections {MAX_CONNECTIONS}): failed records "
        f"{direct.failed_records} of {WORKERS * CONCEPTS_PER_WORKER}, peak server connections "
        f"{direct.peak_connections}, errors {len(direct.errors)}, {direct.seconds:.1f} s"
    )
    assert direct.peak_connections > POOL_SIZE
