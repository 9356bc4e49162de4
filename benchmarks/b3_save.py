"""B3: the database time per saved item through the generate function's path, against a raw loop.

What it measures, on a roadmap of 100 concepts whose tutorials were lost (one
item per message, SQS events of template.yaml's BatchSize, the template
generator; without ``--quick`` also 30 and 300 concepts):
    - the time each saved item spends in pg8000's DB-API calls (every
      statement with its placeholder conversion, BEGIN, COMMIT, the pool's
      pre-ping) through ``content_retry.worker.handle_retry_batch``, against a
      raw pg8000 loop doing the minimum per item (flip the latest row, insert
      the version, set the framework status, commit); the item's whole time
      for both, beside it;
    - round trips per item, as the engine's events count them, and pg8000's
      network exchanges (three per parameterised statement);
    - pg8000's placeholder conversion of the pass's statement texts, per item:
      what caching it per text would save.

Both run in this process, over the same socket and driver, against the same
roadmap and table, in alternation; the same clock times both. In Lambda each
item also waits 10 to 60 s for the LLM, so a millisecond here is 0.01% of it.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moto import mock_aws
from sqlalchemy import Engine, text

from benchmarks.data import add_lost_tutorials_roadmap
from benchmarks.harness import (
    REPO_ROOT,
    BenchEnv,
    EngineCounter,
    Postgres,
    Result,
    WireCounter,
    alternate,
    analyze,
    ms,
    quiet_powertools,
    say,
    settings_for,
)
from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.database import build_engine
from content_retry.generated import TutorialContent
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import Preferences, messages_for_plan
from content_retry.observability import metrics
from content_retry.plan import RetryPlan
from content_retry.plan.build import build_retry_plan
from content_retry.repositories import tasks
from content_retry.worker import WorkerDependencies, handle_retry_batch
from content_retry_local.template import create_queues, resource

ID = "B3"
WHAT = "generate path: database time per saved item vs a raw pg8000 loop; round trips per item"
GOAL = "<=2x the raw loop's database time/item; <=4 round trips/item"
# The shortest LLM call a saved item waits for in production (DESIGN: 10 to 60 s).
LLM_CALL_SECONDS = 10.0
DATABASE = "bench_b3"
# Roadmap sizes: the goal is judged at 100 concepts; the others show how the
# per-item cost follows the roadmap's size.
HEADLINE_SIZE = 100
BATCH_SIZE = int(
    resource("GenerateFunction")["Properties"]["Events"]["RetryMessages"]["Properties"]["BatchSize"]
)

# The raw loop: the minimal transaction that saves one item.
FLIP_LATEST = (
    "UPDATE tutorials SET is_latest = false "
    "WHERE roadmap_id = %s AND concept_id = %s AND is_latest RETURNING content_version"
)
INSERT_VERSION = (
    "INSERT INTO tutorials (roadmap_id, concept_id, title, content, content_status, "
    "content_version, is_latest) VALUES (%s, %s, %s, %s, 'completed', %s, true)"
)
SET_STATUS = (
    "UPDATE roadmap_metadata SET framework_data = "
    "jsonb_set(framework_data, CAST(%s AS text[]), '\"completed\"') WHERE roadmap_id = %s"
)


def sqs_events(bodies: list[str], batch_size: int) -> list[dict[str, Any]]:
    """SQS events shaped like events/sqs-retry-batch.json, ``batch_size`` records each."""
    sample = json.loads((REPO_ROOT / "events" / "sqs-retry-batch.json").read_text())
    template = sample["Records"][0]
    events = []
    for start in range(0, len(bodies), batch_size):
        records = []
        for number, body in enumerate(bodies[start : start + batch_size], start=start):
            record = copy.deepcopy(template)
            record["messageId"] = f"message-{number}"
            record["body"] = body
            records.append(record)
        events.append({"Records": records})
    return events


class WorkerRun:
    """One pass of the worker over the whole plan, under a new task each time
    (the ledger saves an item once per task)."""

    def __init__(self, deps: WorkerDependencies, plan: RetryPlan) -> None:
        self.deps = deps
        self.plan = plan
        self.events: list[dict[str, Any]] = []

    def prepare(self) -> None:
        with self.deps.engine.begin() as connection:
            # The worker skips an item someone already completed (the earlier
            # passes, the raw loop): retire those versions so every pass saves
            # every item anew, on top of the old versions.
            connection.execute(
                text("UPDATE tutorials SET is_latest = false WHERE roadmap_id = :r AND is_latest"),
                {"r": self.plan.roadmap_id},
            )
            task_id = tasks.create_task(connection, self.plan, trigger="invoke", preferences={})
        bodies = [m.to_body() for m in messages_for_plan(task_id, self.plan, Preferences())]
        self.events = sqs_events(bodies, BATCH_SIZE)

    def __call__(self) -> None:
        with quiet_powertools():
            for event in self.events:
                response = handle_retry_batch(event, None, self.deps)
                # What the handler's @metrics.log_metrics does after every invocation.
                metrics.flush_metrics()
                assert not response["batchItemFailures"], response
        with self.deps.engine.connect() as connection:
            saved = connection.execute(
                text("SELECT count(*) FROM tutorials WHERE roadmap_id = :r AND is_latest"),
                {"r": self.plan.roadmap_id},
            ).scalar_one()
        assert saved == self.plan.item_count, f"the pass saved {saved} of {self.plan.item_count}"


class RawLoop:
    """The baseline: per item, flip the latest row, insert the version, set the
    framework status, commit; with content generated beforehand."""

    def __init__(self, postgres: Postgres, database: str, plan: RetryPlan) -> None:
        self.roadmap_id = plan.roadmap_id
        self.connection = postgres.connect(database)
        paths = self._status_paths()
        generator, preferences = TemplateGenerator(), Preferences()
        self.items: list[tuple[str, str, str, list[str]]] = []
        for concept_plan in plan.concepts:
            concept = concept_plan.concept
            content = generator.generate(
                Concept(
                    concept_id=concept.concept_id,
                    name=concept.name or concept.concept_id,
                    description=concept.description,
                    stage=concept.stage,
                    module=concept.module,
                ),
                ContentType.TUTORIAL,
                preferences,
            ).content
            assert isinstance(content, TutorialContent)
            self.items.append(
                (
                    concept.concept_id,
                    content.title,
                    content.content_markdown,
                    paths[concept.concept_id],
                )
            )

    def _status_paths(self) -> dict[str, list[str]]:
        """Where each concept's tutorial status sits in framework_data (the raw
        loop's shortcut: the worker finds the concept by id instead)."""
        cursor = self.connection.cursor()
        cursor.execute(
            "SELECT framework_data FROM roadmap_metadata WHERE roadmap_id = %s", (self.roadmap_id,)
        )
        (framework,) = cursor.fetchone()
        self.connection.rollback()
        return {
            concept["concept_id"]: [
                "stages",
                str(i),
                "modules",
                str(j),
                "concepts",
                str(k),
                "content_status",
            ]
            for i, stage in enumerate(framework["stages"])
            for j, module in enumerate(stage["modules"])
            for k, concept in enumerate(module["concepts"])
        }

    def __call__(self) -> None:
        cursor = self.connection.cursor()
        for concept_id, title, body, path in self.items:
            cursor.execute(FLIP_LATEST, (self.roadmap_id, concept_id))
            previous = cursor.fetchone()
            version = previous[0] + 1 if previous else 1
            cursor.execute(INSERT_VERSION, (self.roadmap_id, concept_id, title, body, version))
            cursor.execute(SET_STATUS, (path, self.roadmap_id))
            self.connection.commit()

    def close(self) -> None:
        self.connection.close()


class DatabaseClock:
    """Seconds spent in pg8000's DB-API calls, whoever made them.

    Wraps the classes' ``Cursor.execute`` (which sends BEGIN first when a
    transaction is due, converts the placeholders and waits for the rows),
    ``Connection.commit`` and ``Connection.rollback``, of both pg8000.legacy
    (SQLAlchemy's) and pg8000.dbapi (the raw loop's). It patches the classes,
    so it times every pg8000 connection of the process: use it single-threaded.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._originals: list[tuple[type, str, Callable[..., Any]]] = []

    def _timing(self, method: Callable[..., Any]) -> Callable[..., Any]:
        clock = self

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            clock._depth += 1
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                clock._depth -= 1
                if clock._depth == 0:
                    clock.seconds += time.perf_counter() - start

        return timed_call

    def __enter__(self) -> DatabaseClock:
        import pg8000.dbapi
        import pg8000.legacy

        for module in (pg8000.legacy, pg8000.dbapi):
            for cls, name in (
                (module.Cursor, "execute"),
                (module.Connection, "commit"),
                (module.Connection, "rollback"),
            ):
                original = getattr(cls, name)
                self._originals.append((cls, name, original))
                setattr(cls, name, self._timing(original))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, original in reversed(self._originals):
            setattr(cls, name, original)
        self._originals.clear()


class Timed:
    """A subject of :func:`alternate` that also keeps each call's database seconds."""

    def __init__(self, subject: Callable[[], object], clock: DatabaseClock) -> None:
        self.subject = subject
        self.clock = clock
        self.database_seconds: list[float] = []

    def __call__(self) -> None:
        before = self.clock.seconds
        self.subject()
        self.database_seconds.append(self.clock.seconds - before)

    def median(self, warmup: int) -> float:
        return statistics.median(self.database_seconds[warmup:])


@dataclass
class Measured:
    items: int
    worker_seconds: float  # the pass, end to end
    raw_seconds: float
    worker_database_seconds: float  # of which in pg8000's calls
    raw_database_seconds: float

    def per_item(self, seconds: float) -> float:
        return seconds / self.items

    @property
    def ratio(self) -> float:
        """The worker's database time per item over the raw loop's."""
        return self.worker_database_seconds / self.raw_database_seconds


def _measure(
    env: BenchEnv, deps: WorkerDependencies, concepts: int, rounds: int
) -> tuple[Measured, WorkerRun, RawLoop]:
    """Per-item database time and whole time of the worker and of the raw loop
    on a new roadmap."""
    roadmap_id = f"save-{concepts}"
    with deps.engine.begin() as connection:
        add_lost_tutorials_roadmap(connection, roadmap_id, concepts)
    analyze(deps.engine)
    with deps.engine.begin() as connection:
        plan = build_retry_plan(connection, roadmap_id)
    assert plan.item_count == concepts, plan.item_count
    worker, raw = WorkerRun(deps, plan), RawLoop(env.postgres, DATABASE, plan)
    warmup = 1
    with DatabaseClock() as clock:
        timed_worker, timed_raw = Timed(worker, clock), Timed(raw, clock)
        times = alternate(
            {"worker": timed_worker, "raw": timed_raw},
            rounds=rounds,
            warmup=warmup,
            setup={"worker": worker.prepare},
        )
    measured = Measured(
        concepts,
        times["worker"],
        times["raw"],
        timed_worker.median(warmup),
        timed_raw.median(warmup),
    )
    worker_database, worker_all, raw_database, raw_all = (
        ms(measured.per_item(seconds))
        for seconds in (
            measured.worker_database_seconds,
            measured.worker_seconds,
            measured.raw_database_seconds,
            measured.raw_seconds,
        )
    )
    say(
        f"{concepts:>4} concepts, per item: worker {worker_database} in the database of "
        f"{worker_all}; raw loop {raw_database} of {raw_all}: database time {measured.ratio:.2f}x"
    )
    return measured, worker, raw


def conversion_seconds(statements: list[str], repeat: int = 21) -> float:
    """Seconds pg8000 spends converting these texts' ``%s`` placeholders to
    ``$n``, as it does on every execution: the least of ``repeat`` passes (a
    cost of the CPU alone, so the least disturbed pass is the truest)."""
    from pg8000.dbapi import convert_paramstyle  # pg8000.legacy's, unwrapped

    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for statement in statements:
            convert_paramstyle("format", statement, ())
        samples.append(time.perf_counter() - start)
    return min(samples)


def run(env: BenchEnv) -> Result:
    url = env.postgres.create_database(DATABASE)
    engine: Engine = build_engine(settings_for(url), pool_size=1)
    sizes = (HEADLINE_SIZE,) if env.quick else (30, HEADLINE_SIZE, 300)
    results: dict[int, Measured] = {}
    say(f"one item per message, events of {BATCH_SIZE} records (template.yaml's BatchSize)")
    with mock_aws():
        import boto3

        sqs = boto3.client("sqs", region_name="us-east-1")
        queue_url, dlq_url = create_queues(sqs)
        settings = settings_for(url, RETRY_QUEUE_URL=queue_url, RETRY_DLQ_URL=dlq_url)
        deps = WorkerDependencies(
            engine=engine, sqs=sqs, settings=settings, generator=TemplateGenerator()
        )
        try:
            for size in sizes:
                rounds = (5 if env.quick else 21) if size == HEADLINE_SIZE else 7
                results[size], worker, raw = _measure(env, deps, size, rounds)
                if size == HEADLINE_SIZE:
                    # Round trips, on one more pass of each (not timed).
                    worker.prepare()
                    with EngineCounter(engine) as events, WireCounter() as worker_wire:
                        worker()
                    with WireCounter() as raw_wire:
                        raw()
                raw.close()
        finally:
            engine.dispose()

    headline = results[HEADLINE_SIZE]
    items = headline.items
    per_item = events.round_trips / items
    database_ms = headline.per_item(headline.worker_database_seconds) * 1000
    converting = conversion_seconds(events.statements) / items
    say(
        f"at {HEADLINE_SIZE} concepts: {database_ms:.2f} ms per item in the database, "
        f"{headline.ratio:.2f}x the raw loop's (goal <= 2x); end to end "
        f"{headline.worker_seconds / headline.raw_seconds:.2f}x the raw loop's time"
    )
    say(
        f"worker per item: {len(events.statements) / items:.2f} statements + "
        f"{events.begins / items:.2f} BEGIN + {events.commits / items:.2f} COMMIT + "
        f"{events.checkouts / items:.2f} checkout pings = {per_item:.2f} round trips "
        "(goal <= 4)"
    )
    say(
        f"driver network exchanges per item: worker {worker_wire.exchanges / items:.1f}, "
        f"raw loop {raw_wire.exchanges / items:.1f} (pg8000: 3 per parameterised statement)"
    )
    say(
        f"pg8000's placeholder conversion: {ms(converting)} per item "
        f"({sum(map(len, events.statements)) / items:,.0f} characters of SQL), inside the "
        "database time; cached per text it would save that much"
    )
    say(
        f"next to an LLM call of {LLM_CALL_SECONDS:.0f} s at the least: the database time is "
        f"{database_ms / (LLM_CALL_SECONDS * 1000):.3%} of an item, the conversion "
        f"{converting / LLM_CALL_SECONDS:.4%}"
    )
    others = ", ".join(f"{results[s].ratio:.2f}x at {s}" for s in sizes if s != HEADLINE_SIZE)
    return Result(
        ID,
        WHAT,
        GOAL,
        f"{headline.ratio:.2f}x ({database_ms:.2f} vs "
        f"{headline.per_item(headline.raw_database_seconds) * 1000:.2f} ms/item"
        f"{'; ' + others if others else ''}); {per_item:.2f} round trips/item "
        f"({worker_wire.exchanges / items:.1f} pg8000 exchanges); conversion {ms(converting)}/item",
        headline.ratio <= 2 and per_item <= 4,
    )
