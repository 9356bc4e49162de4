"""A seeded fault-injection run: faults at set rates, the system driven to rest,
and every invariant checked. Replay a failure with RELIABILITY_SEED=<seed>.

Faults: LLM throttling and timeouts, permanent LLM errors (some items never
succeed), malformed LLM output, the database connection killed between
generation and save, duplicate deliveries (within a batch and across
batches), invocations cut off for time, and SQS send failures in detect.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from content_retry.aws import BEDROCK_MAX_ATTEMPTS
from content_retry.concepts import Concept
from content_retry.content_types import STORAGE, ContentType
from content_retry.generators import (
    ContentGenerator,
    Generation,
    PermanentGenerationError,
    TransientGenerationError,
)
from content_retry.generators.bedrock import BedrockGenerator
from content_retry.messages import Preferences, RetryMessage
from content_retry.retries import DetectDependencies, start_retry
from content_retry.sweep import sweep
from content_retry.worker import WorkerDependencies, handle_retry_batch
from content_retry_local.bedrock_server import LocalBedrock
from content_retry_local.lambda_runtime import redrive, sqs_record
from content_retry_local.seed import ConceptSeed, insert_roadmap, single_module_framework
from content_retry_local.sessions import EngineSessions
from content_retry_local.template import resource
from tests.conftest import FakeLambdaContext, Queues
from tests.support import FlakySqs, detect_deps, holds_expire, worker_deps

SEED = int(os.environ.get("RELIABILITY_SEED", "20261127"))
ROADMAPS = 10
CONCEPTS = 20
RATES = {
    "llm_throttled": 0.06,  # by the local Bedrock: 429 ThrottlingException (botocore retries)
    "llm_malformed": 0.05,  # by the local Bedrock: a tool call that breaks the schema
    "llm_timeout": 0.05,
    "doomed_item": 0.03,  # share of items whose LLM call always fails permanently
    "db_killed_before_save": 0.04,
    "duplicate_delivery": 0.15,
    "invocation_cut_off": 0.08,
    "sqs_send_failed": 0.08,
}
MAX_RECEIVE_COUNT = int(resource("RetryQueue")["Properties"]["RedrivePolicy"]["maxReceiveCount"])
MAX_ROUNDS = 8
MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"

Item = tuple[str, str, str]  # roadmap, concept, content type


@dataclass
class Faults:
    """Draws which faults happen, reproducibly for a seed.

    Draws made on the main thread (deliveries, sends) come from one sequence;
    the generator's, made on the worker's threads in whatever order they run,
    are drawn from what they are about (the item and its call number), so a
    run replays the same faults whatever the threads' timing.
    """

    rng: random.Random
    injected: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def roll(self, kind: str, about: object = None) -> bool:
        if about is None:
            draw = self.rng.random()
        else:
            draw = random.Random(f"{SEED}:{kind}:{about}").random()
        hit = draw < RATES[kind]
        if hit:
            with self._lock:
                self.injected[kind] += 1
        return hit


class FaultyGenerator:
    """Bedrock through the production client, pointed at the local Bedrock (which
    throttles and answers malformed at the set rates), with the faults a server
    cannot stage around it: items doomed to fail, timeouts, the worker's
    database connection cut just before the save. Counts calls per item."""

    name = "faulty"

    def __init__(
        self,
        inner: ContentGenerator,
        faults: Faults,
        doomed: set[Item],
        worker_sessions: EngineSessions,
    ) -> None:
        self.inner = inner
        self.faults = faults
        self.doomed = doomed
        self.calls: Counter[Item] = Counter()
        self._lock = threading.Lock()
        self._worker_sessions = worker_sessions

    def generate(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> Generation:
        # concept ids are "r<roadmap>-c<n>": unique across roadmaps
        item = (concept.concept_id.split("-")[0], concept.concept_id, content_type.value)
        with self._lock:
            self.calls[item] += 1
            call = (item, self.calls[item])
        if item in self.doomed:
            with self._lock:
                self.faults.injected["llm_permanent"] += 1
            raise PermanentGenerationError("ValidationException: the model refuses this concept")
        if self.faults.roll("llm_timeout", call):
            raise TransientGenerationError("bedrock unreachable: Read timeout on endpoint URL")
        generation = self.inner.generate(concept, content_type, preferences)
        if self.faults.roll("db_killed_before_save", call):
            self._worker_sessions.terminate()
        return generation


@dataclass
class Run:
    queues: Queues
    deps: WorkerDependencies
    generator: FaultyGenerator
    faults: Faults
    enqueues: Counter[Item] = field(default_factory=Counter)
    invocations: int = 0

    def drain(self) -> None:
        """Lambda's poller, with duplicate deliveries and invocations cut off for time."""
        sqs, url = self.queues.sqs, self.queues.queue_url
        for _ in range(2_000):
            messages = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=5, WaitTimeSeconds=0, AttributeNames=["All"]
            ).get("Messages", [])
            if not messages:
                if not self.waiting():
                    return
                time.sleep(0.5)  # a record sent back with a delay (the quota's, say)
                continue
            records = [
                sqs_record(
                    m["Body"],
                    m["MessageId"],
                    receipt_handle=m["ReceiptHandle"],
                    receive_count=m["Attributes"]["ApproximateReceiveCount"],
                )
                for m in messages
            ]
            if self.faults.roll("duplicate_delivery"):  # the same message twice in one batch
                records.append({**records[0], "messageId": records[0]["messageId"] + "-dup"})
            if self.faults.roll("duplicate_delivery"):  # and again, later
                sqs.send_message(QueueUrl=url, MessageBody=messages[-1]["Body"])
            context = FakeLambdaContext()
            if self.faults.roll("invocation_cut_off"):
                context.remaining_ms = 5_000  # less than one LLM call's budget
            response = handle_retry_batch({"Records": records}, context, self.deps)
            self.invocations += 1
            failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
            if failed:
                # Made visible at once below, as if their visibility timeout (30
                # minutes) had passed: by then every invocation's hold has too.
                holds_expire(self.deps.engine)
            for message in messages:
                if message["MessageId"] in failed:
                    sqs.change_message_visibility(
                        QueueUrl=url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                    )
                else:
                    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        raise AssertionError("the queue did not drain in 2,000 batches")

    def waiting(self) -> bool:
        """Messages still delayed or in flight on the retry queue."""
        attributes = self.queues.sqs.get_queue_attributes(
            QueueUrl=self.queues.queue_url,
            AttributeNames=[
                "ApproximateNumberOfMessagesDelayed",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )["Attributes"]
        return any(int(value) for value in attributes.values())

    def redrive(self) -> int:
        dead = self.queues.sqs.receive_message(
            QueueUrl=self.queues.dlq_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            VisibilityTimeout=0,
        ).get("Messages", [])
        for message in dead:
            body = RetryMessage.model_validate_json(message["Body"])
            for item in body.items:
                self.enqueues[
                    (body.roadmap_id, body.concept.concept_id, item.content_type.value)
                ] += 1
        return redrive(
            self.queues.sqs, self.queues.dlq_url, self.queues.queue_url, use_move_task=False
        ).moved


def seed_roadmaps(connection: Connection) -> set[Item]:
    """N roadmaps x M concepts, every item missing; returns the items."""
    items: set[Item] = set()
    for r in range(ROADMAPS):
        concepts = [
            ConceptSeed(f"r{r}-c{c}", f"Concept {r}.{c}", f"About concept {r}.{c}.")
            for c in range(CONCEPTS)
        ]
        insert_roadmap(
            connection, f"r{r}", f"u-{r}", single_module_framework(concepts), age_minutes=120
        )
        items |= {(f"r{r}", f"r{r}-c{c}", t.value) for c in range(CONCEPTS) for t in ContentType}
    connection.commit()
    return items


def let_time_pass(db: Engine) -> None:
    """Leases and cooldowns expire: every time the pipeline keeps moves a day back."""
    with db.begin() as connection:
        for statement in (
            "UPDATE retry_items SET claimed_at = claimed_at - interval '1 day'",
            "UPDATE retry_tasks SET created_at = created_at - interval '1 day'",
            "UPDATE roadmap_sweeps SET swept_at = swept_at - interval '1 day'",
        ):
            connection.execute(text(statement))


def open_items(db: Engine) -> set[Item]:
    with db.connect() as connection:
        return {
            (row.roadmap_id, row.concept_id, row.content_type)
            for row in connection.execute(
                text(
                    "SELECT roadmap_id, concept_id, content_type FROM retry_items "
                    "WHERE status IN ('queued', 'running')"
                )
            )
        }


def drive_to_rest(run: Run, detect: DetectDependencies, db: Engine, doomed: set[Item]) -> None:
    """Drain, re-drive the DLQ, let the claims expire and sweep, until nothing is left
    but the items doomed to fail; then count every enqueue from the ledger."""
    for round_number in range(MAX_ROUNDS):
        run.drain()
        while run.redrive():
            run.drain()
        let_time_pass(db)
        swept = sweep(detect)
        print(f"round {round_number}: sweep planned {swept.retried_count} item(s)")
        if open_items(db) <= doomed and swept.retried_count <= len(doomed):
            run.drain()
            break
    with db.connect() as connection:
        for row in connection.execute(
            text("SELECT roadmap_id, concept_id, content_type FROM retry_items")
        ):
            run.enqueues[(row.roadmap_id, row.concept_id, row.content_type)] += 1


@dataclass
class EndState:
    """What the database holds at rest."""

    versions: dict[Item, list[tuple[int, bool, str]]]
    latest_ledger: dict[Item, tuple[str, str | None]]
    succeeded: set[Item]
    frameworks: dict[str, Any]

    @classmethod
    def read(cls, db: Engine) -> EndState:
        with db.connect() as connection:
            versions: dict[Item, list[tuple[int, bool, str]]] = {}
            for content_type, storage in STORAGE.items():
                for row in connection.execute(
                    text(
                        "SELECT roadmap_id, concept_id, content_version, is_latest, "
                        f"content_status FROM {storage.table}"
                    )
                ):
                    versions.setdefault(
                        (row.roadmap_id, row.concept_id, content_type.value), []
                    ).append((row.content_version, row.is_latest, row.content_status))
            latest_ledger = {
                (row.roadmap_id, row.concept_id, row.content_type): (row.status, row.last_error)
                for row in connection.execute(
                    text(
                        "SELECT DISTINCT ON (i.roadmap_id, i.concept_id, i.content_type) "
                        "i.roadmap_id, i.concept_id, i.content_type, i.status, i.last_error "
                        "FROM retry_items AS i JOIN retry_tasks AS t USING (task_id) "
                        "ORDER BY i.roadmap_id, i.concept_id, i.content_type, t.created_at DESC"
                    )
                )
            }
            succeeded = {
                (row.roadmap_id, row.concept_id, row.content_type)
                for row in connection.execute(
                    text(
                        "SELECT DISTINCT roadmap_id, concept_id, content_type FROM retry_items "
                        "WHERE status = 'succeeded'"
                    )
                )
            }
            frameworks: dict[str, Any] = dict(
                connection.execute(
                    text("SELECT roadmap_id, framework_data FROM roadmap_metadata")
                ).all()
            )
        return cls(versions, latest_ledger, succeeded, frameworks)

    @property
    def completed(self) -> set[Item]:
        return {
            item
            for item, versions in self.versions.items()
            if any(latest and status == "completed" for _, latest, status in versions)
        }

    @property
    def failed_with_reason(self) -> set[Item]:
        return {
            item
            for item, (status, error) in self.latest_ledger.items()
            if status == "failed" and error
        }

    def framework_disagreements(self) -> list[tuple[Item, str | None]]:
        """Items whose framework status is not what their rows say."""
        completed = self.completed
        disagreeing = []
        for roadmap_id, framework in self.frameworks.items():
            for concept in framework["stages"][0]["modules"][0]["concepts"]:
                for content_type, storage in STORAGE.items():
                    item = (roadmap_id, concept["concept_id"], content_type.value)
                    status = concept.get(storage.status_key)
                    if status != ("completed" if item in completed else "failed"):
                        disagreeing.append((item, status))
        return disagreeing


@pytest.fixture
def local_bedrock() -> Iterator[LocalBedrock]:
    """The local Bedrock, throttling and answering malformed at the set rates."""
    with LocalBedrock(
        throttle_rate=RATES["llm_throttled"], malformed_rate=RATES["llm_malformed"], seed=SEED
    ) as bedrock:
        yield bedrock


def test_under_injected_faults_nothing_is_lost_or_saved_twice(
    connection: Connection, db: Engine, queues: Queues, local_bedrock: LocalBedrock
) -> None:
    rng = random.Random(SEED)
    faults = Faults(rng)
    print(f"\nreliability run: seed={SEED} roadmaps={ROADMAPS} concepts={CONCEPTS} rates={RATES}")

    # GIVEN N roadmaps x M concepts, every item missing, a few doomed to fail permanently
    items = seed_roadmaps(connection)
    doomed = {item for item in sorted(items) if rng.random() < RATES["doomed_item"]}
    detect = detect_deps(db, queues.sqs)
    # Bedrock's real client path over HTTP: serialization, botocore's retries (standard
    # mode: the deployed client's adaptive limiter would pace this compressed run to
    # a crawl), tool use, usage.
    client = local_bedrock.client(retry_mode="standard", max_attempts=BEDROCK_MAX_ATTEMPTS)
    bedrock_generator = BedrockGenerator(client, MODEL)
    generator = FaultyGenerator(bedrock_generator, faults, doomed, EngineSessions(detect.engine))
    run = Run(queues, worker_deps(db, queues.sqs, generator), generator, faults)
    detect.sqs = FlakySqs(queues.sqs, lambda body: faults.roll("sqs_send_failed"))

    # WHEN every roadmap is retried through detect, then the system is driven to rest
    for r in range(ROADMAPS):
        start_retry(detect, f"r{r}", trigger="api")
    drive_to_rest(run, detect, db, doomed)

    # THEN every item ended completed, or failed with a reason; none is lost
    end = EndState.read(db)
    lost = items - end.completed - end.failed_with_reason
    duplicates = {item: versions for item, versions in end.versions.items() if len(versions) > 1}
    not_one_latest = {
        item for item, versions in end.versions.items() if sum(v[1] for v in versions) != 1
    }
    calls_bound = {
        item: calls
        for item, calls in generator.calls.items()
        if calls > MAX_RECEIVE_COUNT * run.enqueues[item]
    }
    bedrock = local_bedrock.stats()
    faults.injected["llm_throttled"] = bedrock.throttled
    faults.injected["llm_malformed"] = bedrock.malformed
    figures = {
        "seed": SEED,
        "items": len(items),
        "completed": len(end.completed),
        "failed_with_reason": len(end.failed_with_reason),
        "doomed": len(doomed),
        "lost": len(lost),
        "duplicate_versions": len(duplicates),
        "dlq_left": queues.depth(queues.dlq_url),
        "invocations": run.invocations,
        "llm_calls": sum(generator.calls.values()),
        "max_llm_calls_per_item": max(generator.calls.values()),
        "bedrock_requests": bedrock.requests,
        "tokens": bedrock.total_tokens,
        "faults_injected": dict(sorted(faults.injected.items())),
    }
    print("reliability figures: " + json.dumps(figures))

    assert lost == set(), f"lost items: {sorted(lost)[:10]}"
    assert doomed <= end.failed_with_reason
    assert duplicates == {}
    assert not_one_latest == set()
    assert figures["dlq_left"] == 0
    assert end.succeeded == end.completed, "ledger and tables disagree"
    assert end.framework_disagreements() == []
    assert calls_bound == {}, calls_bound
    # each call is at most BEDROCK_MAX_ATTEMPTS requests to Bedrock, retries included
    assert bedrock.requests <= BEDROCK_MAX_ATTEMPTS * bedrock.answered + bedrock.throttled
    assert all(faults.injected[kind] for kind in RATES if kind != "doomed_item"), faults.injected
