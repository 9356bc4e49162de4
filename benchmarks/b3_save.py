"""B3: items saved per second through the generate function's path, against a raw loop.

What it measures:
    - items saved per second by ``content_retry.worker.handle_retry_batch``
      with the template generator, on SQS events of 5 records (template.yaml's
      BatchSize), one item per message (the seed's shape: lost tutorials, the
      worst case for per-item overhead), built from a real plan and ledger
      (``build_retry_plan`` + ``ledger.create_task`` + ``messages_for_plan``),
      on a roadmap of 100 concepts (the goal's figure) and, without
      ``--quick``, of 30 and 300 (how the cost follows the roadmap's size);
    - the same items saved by a raw pg8000 loop, one transaction per item doing
      the minimum (flip the previous latest row, insert the new version, set
      the framework status): the ratio is worker rate / raw rate;
    - database round trips per item through the worker, as the engine's
      events count them (statements + BEGIN + COMMIT + checkouts, each
      checkout running the pre-ping ``SELECT 1``), and the driver's actual
      network exchanges for both (pg8000 takes three per parameterised
      statement).

Why the baseline is fair: both run in this process, over the same socket,
with the same driver, against the same roadmap and table, in alternation.
The raw loop is handed the content ready-made and knows where each concept
sits in ``framework_data``; the worker parses each message, generates the
content (template), keeps the ledger (claims, attempts, idempotency), logs
and counts metrics (formatted, written to /dev/null). The ratio is what all
of that costs per item; in production the LLM call dwarfs both.
"""

from __future__ import annotations

import copy
import json
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
    quiet_powertools,
    say,
    settings_for,
)
from content_retry import ledger
from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.database import build_engine
from content_retry.generated import TutorialContent
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import Preferences, messages_for_plan
from content_retry.observability import metrics
from content_retry.plan import RetryPlan, build_retry_plan
from content_retry.worker import WorkerDependencies, handle_retry_batch
from content_retry_local.template import create_queues, resource

ID = "B3"
WHAT = "generate path: items saved/s vs a raw pg8000 loop; round trips per item"
GOAL = ">=0.5x raw loop; <=4 round trips/item"
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
            task_id = ledger.create_task(connection, self.plan, trigger="invoke", preferences={})
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


@dataclass
class Measured:
    items: int
    worker_rate: float
    raw_rate: float

    @property
    def ratio(self) -> float:
        return self.worker_rate / self.raw_rate


def _measure(
    env: BenchEnv, deps: WorkerDependencies, concepts: int, rounds: int
) -> tuple[Measured, WorkerRun, RawLoop]:
    """Items per second of the worker and of the raw loop on a new roadmap."""
    roadmap_id = f"save-{concepts}"
    with deps.engine.begin() as connection:
        add_lost_tutorials_roadmap(connection, roadmap_id, concepts)
    analyze(deps.engine)
    with deps.engine.begin() as connection:
        plan = build_retry_plan(connection, roadmap_id)
    assert plan.item_count == concepts, plan.item_count
    worker, raw = WorkerRun(deps, plan), RawLoop(env.postgres, DATABASE, plan)
    times = alternate(
        {"worker": worker, "raw": raw}, rounds=rounds, setup={"worker": worker.prepare}
    )
    measured = Measured(concepts, concepts / times["worker"], concepts / times["raw"])
    say(
        f"{concepts:>4} concepts: worker {measured.worker_rate:>5,.0f} items/s, raw loop "
        f"{measured.raw_rate:>5,.0f} items/s: ratio {measured.ratio:.2f}x"
    )
    return measured, worker, raw


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
    say(f"at {HEADLINE_SIZE} concepts: ratio {headline.ratio:.2f}x (goal >= 0.5x)")
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
    others = ", ".join(f"{results[s].ratio:.2f}x at {s}" for s in sizes if s != HEADLINE_SIZE)
    return Result(
        ID,
        WHAT,
        GOAL,
        f"{headline.ratio:.2f}x ({headline.worker_rate:,.0f} vs {headline.raw_rate:,.0f} "
        f"items/s{'; ' + others if others else ''}); {per_item:.2f} round trips/item "
        f"({worker_wire.exchanges / items:.1f} pg8000 exchanges)",
        headline.ratio >= 0.5 and per_item <= 4,
    )
