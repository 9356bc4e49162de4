"""B6: peak server connections of concurrent generate workers, through PgBouncer.

What it measures: 20 concurrent workers (threads, each with its own engine
from ``build_engine(pool_size=1)``, as each Lambda container has its own)
save items through ``handle_retry_batch``, first straight to PostgreSQL, then
through PgBouncer in transaction pooling mode with ``default_pool_size = 10``
(what RDS Proxy does in production). A separate process samples
``pg_stat_activity`` every 2 ms from its own direct connection, counting the
client backends of the benchmark's database (its own connection is to
another database, so it never counts itself). Reported: peak server
connections per worker, and peak against PgBouncer's pool size.

Why the baseline is fair: the direct run is the same workers, data and
batches without the pooler; it shows what each worker holds (the goal: at
most one connection per worker), and the PgBouncer run shows that the
worker pins nothing (no session state, no prepared statements, no
``SET``), so the pooler can share server connections between them and the
database never sees more than the pool.

Needs ``pgbouncer`` (Debian package ``pgbouncer``); prints
``skipped: pgbouncer not installed`` without it. PgBouncer refuses to run as
root, so as root it runs as the ``pgserver`` user the pgserver wheel creates
(or ``postgres``), with its files in a temporary folder that user owns.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

from moto import mock_aws
from sqlalchemy import Engine

from benchmarks.b3_save import BATCH_SIZE, sqs_events
from benchmarks.data import add_lost_tutorials_roadmap
from benchmarks.harness import BenchEnv, Result, quiet_powertools, say, settings_for
from content_retry.database import build_engine
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import Preferences, messages_for_plan
from content_retry.plan import RetryPlan
from content_retry.plan.build import build_retry_plan
from content_retry.repositories import tasks
from content_retry.worker import WorkerDependencies, handle_retry_batch
from content_retry_local.pgbouncer import PgBouncer, find_pgbouncer
from content_retry_local.template import create_queues

ID = "B6"
WHAT = "server connections of 20 concurrent workers, direct and through PgBouncer"
GOAL = "<=1 per worker; never above the pool (10)"
DATABASE = "bench_b6"
WORKERS = 20
POOL_SIZE = 10
SAMPLE_EVERY_SECONDS = 0.002


# --- the sampler (a separate process, so the workers' GIL does not slow it) ------------------


def sample_connections(
    unix_sock: str, database: str, ready: Event, stop: Event, results: Any
) -> None:
    """Count ``database``'s client backends until ``stop``; put (peak, samples)."""
    import pg8000.native

    connection = pg8000.native.Connection(user="postgres", database="postgres", unix_sock=unix_sock)
    peak = samples = 0
    ready.set()
    while not stop.is_set():
        ((count,),) = connection.run(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND datname = :database",
            database=database,
        )
        peak, samples = max(peak, count), samples + 1
        time.sleep(SAMPLE_EVERY_SECONDS)
    connection.close()
    results.put((peak, samples))


class Sampler:
    """Runs :func:`sample_connections` in a spawned process around a block."""

    def __init__(self, unix_sock: str) -> None:
        self.unix_sock = unix_sock
        self.peak = self.samples = 0

    def __enter__(self) -> Sampler:
        context = multiprocessing.get_context("spawn")
        self._ready, self._stop = context.Event(), context.Event()
        self._results = context.Queue()
        self._process = context.Process(
            target=sample_connections,
            args=(self.unix_sock, DATABASE, self._ready, self._stop, self._results),
            daemon=True,
        )
        self._process.start()
        if not self._ready.wait(30):
            raise RuntimeError("the pg_stat_activity sampler did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.peak, self.samples = self._results.get(timeout=30)
        self._process.join(timeout=10)


# --- the workers ---------------------------------------------------------------------------


@dataclass
class Worker:
    """One concurrent generate worker: its own engine, roadmap and events."""

    number: int
    plan: RetryPlan
    events: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None

    def prepare(self, engine: Engine) -> None:
        """A new task over the worker's plan, as SQS events (untimed)."""
        with engine.begin() as connection:
            task_id = tasks.create_task(connection, self.plan, trigger="invoke", preferences={})
        bodies = [m.to_body() for m in messages_for_plan(task_id, self.plan, Preferences())]
        self.events = sqs_events(bodies, BATCH_SIZE)

    def run(self, url: str, deps_template: WorkerDependencies, start: threading.Barrier) -> None:
        engine = build_engine(settings_for(url), pool_size=1)
        deps = WorkerDependencies(
            engine=engine,
            sqs=deps_template.sqs,
            settings=deps_template.settings,
            generator=deps_template.generator,
        )
        try:
            start.wait()
            for event in self.events:
                response = handle_retry_batch(event, None, deps)
                assert not response["batchItemFailures"], response
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            engine.dispose()


def _run_workers(
    workers: list[Worker], url: str, deps: WorkerDependencies, unix_sock: str
) -> tuple[int, int, float]:
    """All workers at once, sampled; returns (peak connections, samples, seconds)."""
    start = threading.Barrier(len(workers) + 1)
    threads = [
        threading.Thread(target=worker.run, args=(url, deps, start), name=f"worker-{worker.number}")
        for worker in workers
    ]
    with Sampler(unix_sock) as sampler:
        for thread in threads:
            thread.start()
        started = time.perf_counter()
        start.wait()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    errors = [worker.error for worker in workers if worker.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} worker(s) failed, the first: {errors[0]!r}")
    return sampler.peak, sampler.samples, seconds


def _wait_until_idle(env: BenchEnv, timeout: float = 10) -> None:
    """Wait until the benchmark's database has no connection left (a closed
    connection's backend exits a moment after the client closed it)."""
    connection = env.postgres.connect()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cursor = connection.cursor()
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend' AND datname = %s",
                (DATABASE,),
            )
            (count,) = cursor.fetchone()
            connection.rollback()
            if count == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{DATABASE} still has {count} connection(s)")
    finally:
        connection.close()


def run(env: BenchEnv) -> Result:
    if find_pgbouncer() is None:
        say("skipped: pgbouncer not installed")
        return Result(ID, WHAT, GOAL, "skipped: pgbouncer not installed", None)

    postgres = env.postgres
    concepts = 10 if env.quick else 25
    direct_url = postgres.create_database(DATABASE)
    setup_engine = build_engine(settings_for(direct_url), pool_size=1)
    workers: list[Worker] = []
    with mock_aws():
        import boto3

        sqs = boto3.client("sqs", region_name="us-east-1")
        queue_url, dlq_url = create_queues(sqs)
        deps = WorkerDependencies(
            engine=setup_engine,
            sqs=sqs,
            settings=settings_for(direct_url, RETRY_QUEUE_URL=queue_url, RETRY_DLQ_URL=dlq_url),
            generator=TemplateGenerator(),
        )
        for number in range(WORKERS):
            roadmap_id = f"pool-{number}"
            with setup_engine.begin() as connection:
                add_lost_tutorials_roadmap(connection, roadmap_id, concepts)
            with setup_engine.begin() as connection:
                workers.append(Worker(number, build_retry_plan(connection, roadmap_id)))

        peaks: dict[str, int] = {}
        with (
            quiet_powertools(),
            PgBouncer(postgres.socket_dir, postgres.port, [DATABASE], pool_size=POOL_SIZE) as pool,
        ):
            for name, url in (("direct", direct_url), ("pgbouncer", pool.url(DATABASE))):
                for worker in workers:
                    worker.prepare(setup_engine)
                setup_engine.dispose()  # its connection is not a worker's
                _wait_until_idle(env)
                peak, samples, seconds = _run_workers(workers, url, deps, postgres.unix_sock)
                peaks[name] = peak
                items = sum(worker.plan.item_count for worker in workers)
                say(
                    f"{name:<9}: {WORKERS} workers saved {items} items in {seconds:.1f} s; "
                    f"peak {peak} server connections = {peak / WORKERS:.2f} per worker "
                    f"({samples} samples)"
                )
        setup_engine.dispose()

    per_worker = max(peaks.values()) / WORKERS
    met = per_worker <= 1 and peaks["pgbouncer"] <= POOL_SIZE
    say(
        f"through PgBouncer: peak {peaks['pgbouncer']} of a pool of {POOL_SIZE} "
        f"({peaks['pgbouncer'] / POOL_SIZE:.1f}x the pool); direct: {peaks['direct']} for "
        f"{WORKERS} workers"
    )
    return Result(
        ID,
        WHAT,
        GOAL,
        f"direct {peaks['direct'] / WORKERS:.2f}/worker; PgBouncer {peaks['pgbouncer']} = "
        f"{peaks['pgbouncer'] / WORKERS:.2f}/worker, {peaks['pgbouncer'] / POOL_SIZE:.1f}x pool",
        met,
    )
