"""A platform-wide incident: a backlog hours deep, in compressed time.

5,000 lost tutorials (200 roadmaps of 25 concepts) are planned at once, and
the generate function works through them at 600 messages an hour: the queue
holds more than a claim lease of work for over six simulated hours. Every
simulated 15 minutes the sweep runs and owners ask again for the same
roadmaps. Nothing may be planned twice, paid twice or saved twice, the
sweep's cost must stay flat as the backlog drains, and nothing may expire
unseen.

Time is simulated: a tick moves every time the pipeline keeps in PostgreSQL
back by 15 minutes (as the fault-injection suite does), and the queue is a
clock-driven model of SQS (:class:`SimulatedQueues`): at-least-once
delivery, visibility timeouts, receive counts, the redrive policy and the
retention period, on the simulated clock. moto cannot stand in here: its
timeouts run on the wall clock, and each of its queue operations walks every
message in the queue (sending 5,000 takes minutes).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from content_retry.settings import Settings
from content_retry.sweep import sweep
from content_retry.worker import handle_retry_batch
from content_retry_local.lambda_runtime import sqs_record
from content_retry_local.seed import ConceptSeed, insert_roadmap, single_module_framework
from content_retry_local.template import resource
from functions.detect.app import lambda_handler as detect_handler
from tests.conftest import FakeLambdaContext, StatementCounter
from tests.support import CountingGenerator, detect_deps, load_event, worker_deps

ROADMAPS = 200
CONCEPTS = 25  # 5,000 items, one tutorial each: 5,000 messages
TICK_MINUTES = 15
MESSAGES_PER_TICK = 150  # 600 an hour: the queue holds > 60 minutes of work for 7+ hours
OWNERS_ASKING_PER_TICK = 5
LEASE_MINUTES = 60
QUEUE = resource("RetryQueue")["Properties"]
MAX_RECEIVES = int(QUEUE["RedrivePolicy"]["maxReceiveCount"])
VISIBILITY_SECONDS = int(QUEUE["VisibilityTimeout"])
RETENTION_SECONDS = int(QUEUE["MessageRetentionPeriod"])


@dataclass
class _Message:
    message_id: str
    body: str
    attributes: dict[str, Any]
    sent: float
    visible_at: float = 0.0
    receives: int = 0
    receipt: str = ""


@dataclass
class SimulatedQueues:
    """The retry queue and its dead-letter queue, as SQS behaves, on a simulated clock.

    Only the calls the pipeline and this test make: sending (one and in
    batches), receiving (which hides a message for the visibility timeout,
    counts the receive, and moves a message received more than
    maxReceiveCount times to the DLQ, as the redrive policy does), deleting,
    and dropping messages older than the retention period.
    """

    queue_url: str = "sim://content-retry"
    dlq_url: str = "sim://content-retry-dlq"
    now: float = 0.0
    queues: dict[str, OrderedDict[str, _Message]] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)
    expired: list[str] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.queues = {self.queue_url: OrderedDict(), self.dlq_url: OrderedDict()}

    def _put(self, url: str, body: str, attributes: dict[str, Any] | None = None) -> str:
        message_id = f"m-{next(self._ids)}"
        self.queues[url][message_id] = _Message(message_id, body, attributes or {}, self.now)
        self.sent[url] += 1
        return message_id

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "Successful": [
                {"Id": entry["Id"], "MessageId": self._put(QueueUrl, entry["MessageBody"])}
                for entry in Entries
            ],
            "Failed": [],
        }

    def send_message(
        self, QueueUrl: str, MessageBody: str, MessageAttributes: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {"MessageId": self._put(QueueUrl, MessageBody, MessageAttributes)}

    def _expire(self, url: str) -> None:
        queue = self.queues[url]
        for message_id in [
            m.message_id for m in queue.values() if m.sent <= self.now - RETENTION_SECONDS
        ]:
            self.expired.append(queue.pop(message_id).body)

    def receive_message(
        self, QueueUrl: str, MaxNumberOfMessages: int = 1, **_: Any
    ) -> dict[str, Any]:
        self._expire(QueueUrl)
        queue = self.queues[QueueUrl]
        received: list[_Message] = []
        for message in list(queue.values()):
            if len(received) == MaxNumberOfMessages:
                break
            if message.visible_at > self.now:
                continue
            if QueueUrl == self.queue_url and message.receives >= MAX_RECEIVES:
                del queue[message.message_id]  # the redrive policy
                self.queues[self.dlq_url][message.message_id] = message
                continue
            message.receives += 1
            message.visible_at = self.now + VISIBILITY_SECONDS
            message.receipt = f"{message.message_id}:{message.receives}"
            received.append(message)
        return {
            "Messages": [
                {
                    "MessageId": m.message_id,
                    "ReceiptHandle": m.receipt,
                    "Body": m.body,
                    "Attributes": {"ApproximateReceiveCount": str(m.receives)},
                    "MessageAttributes": m.attributes,
                }
                for m in received
            ]
        }

    def delete_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        for entry in Entries:
            self.queues[QueueUrl].pop(entry["ReceiptHandle"].split(":")[0], None)
        return {"Successful": [{"Id": entry["Id"]} for entry in Entries], "Failed": []}

    def change_message_visibility(
        self, QueueUrl: str, ReceiptHandle: str, VisibilityTimeout: int
    ) -> None:
        message = self.queues[QueueUrl].get(ReceiptHandle.split(":")[0])
        if message is not None:
            message.visible_at = self.now + VisibilityTimeout

    def depth(self, url: str) -> int:
        self._expire(url)
        return len(self.queues[url])


def let_time_pass(db: Engine, queues: SimulatedQueues, minutes: int) -> None:
    """Everything the pipeline keeps moves ``minutes`` into the past; the queue's clock on."""
    queues.now += minutes * 60
    shift = f"interval '{int(minutes)} minutes'"
    with db.begin() as connection:
        for table, columns in (
            ("retry_items", ("claimed_at", "sent_at", "updated_at")),
            ("retry_tasks", ("created_at", "updated_at")),
            ("roadmap_sweeps", ("swept_at",)),
            ("roadmap_metadata", ("created_at", "updated_at")),
        ):
            assignments = ", ".join(f"{column} = {column} - {shift}" for column in columns)
            connection.execute(text(f"UPDATE {table} SET {assignments}"))


def seed_incident(connection: Connection, roadmaps: int = ROADMAPS) -> None:
    """``roadmaps`` roadmaps whose every tutorial was lost a day ago (their
    resource lists and quizzes were saved)."""
    done = {"resources_status": "completed", "quiz_status": "completed"}
    for r in range(roadmaps):
        concepts = [
            ConceptSeed(
                f"r{r}-c{c}",
                f"Concept {r}.{c}",
                f"About concept {r}.{c}.",
                {"content_status": None, **done},
            )
            for c in range(CONCEPTS)
        ]
        insert_roadmap(
            connection, f"r{r}", f"u-{r}", single_module_framework(concepts), age_minutes=24 * 60
        )
    for table in ("resource_recommendations", "quizzes"):
        connection.execute(
            text(
                f"INSERT INTO {table} (roadmap_id, concept_id, content_status) "
                "SELECT 'r' || r, 'r' || r || '-c' || c, 'completed' "
                "FROM generate_series(0, :roadmaps - 1) AS r, generate_series(0, :concepts - 1) AS c"
            ),
            {"roadmaps": roadmaps, "concepts": CONCEPTS},
        )
    connection.commit()


def work(queues: SimulatedQueues, worker: Any, messages: int) -> int:
    """The generate functions take up to ``messages`` messages in batches of 5; returns how many."""
    taken = 0
    while taken < messages:
        batch = queues.receive_message(queues.queue_url, MaxNumberOfMessages=5)["Messages"]
        if not batch:
            break
        records = [
            sqs_record(
                m["Body"],
                m["MessageId"],
                receipt_handle=m["ReceiptHandle"],
                receive_count=m["Attributes"]["ApproximateReceiveCount"],
            )
            for m in batch
        ]
        response = handle_retry_batch({"Records": records}, FakeLambdaContext(), worker)
        failed = {failure["itemIdentifier"] for failure in response["batchItemFailures"]}
        queues.delete_message_batch(
            queues.queue_url,
            [
                {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                for n, m in enumerate(batch)
                if m["MessageId"] not in failed
            ],
        )
        taken += len(batch)
    return taken


def detect_invocation_time_left(timeout: float = 60.0) -> Callable[[], float]:
    """The seconds left of a detect invocation starting now (the template's timeout)."""
    deadline = time.monotonic() + timeout
    return lambda: deadline - time.monotonic()


def ask_again(detect: Any, roadmap_id: str) -> int:
    """The roadmap's owner asks for its retry through the API; returns retried_count."""
    event = load_event("api-retry.json")
    event["pathParameters"] = {"roadmap_id": roadmap_id}
    event["path"] = f"/roadmaps/{roadmap_id}/retry"
    event["requestContext"]["authorizer"] = {"claims": {"sub": f"u-{roadmap_id[1:]}"}}
    response = detect_handler(event, FakeLambdaContext(), deps=detect)
    assert response["statusCode"] in (200, 202), response
    count: int = json.loads(response["body"])["retried_count"]
    return count


@pytest.fixture
def incident(
    db: Engine, connection: Connection
) -> tuple[SimulatedQueues, Any, Any, CountingGenerator]:
    seed_incident(connection)
    queues = SimulatedQueues()
    settings = Settings(
        DATABASE_URL=str(db.url.render_as_string(hide_password=False)),
        RETRY_QUEUE_URL=queues.queue_url,
        RETRY_DLQ_URL=queues.dlq_url,
        CLAIM_LEASE_MINUTES=str(LEASE_MINUTES),
        RETRY_QUEUE_RETENTION_MINUTES=str(RETENTION_SECONDS // 60),
    )
    generator = CountingGenerator()
    return (
        queues,
        detect_deps(db, queues, settings),
        worker_deps(db, queues, generator, settings),
        generator,
    )


def test_a_backlog_hours_deep_costs_no_duplicate_work(
    db: Engine, incident: tuple[SimulatedQueues, Any, Any, CountingGenerator]
) -> None:
    queues, detect, worker, generator = incident
    rng = random.Random(20261128)
    items = ROADMAPS * CONCEPTS
    deep_ticks, replanned_by_owners, sweeps = 0, 0, []

    # WHEN the sweep finds the incident, then every 15 minutes the sweep runs,
    # owners ask again, and the workers take what they can
    for tick in range(200):
        with StatementCounter(db) as counter:
            outcome = sweep(detect, detect_invocation_time_left())
        sweeps.append((tick, queues.depth(queues.queue_url), outcome, counter.count))
        for roadmap in rng.sample(range(ROADMAPS), OWNERS_ASKING_PER_TICK):
            replanned_by_owners += ask_again(detect, f"r{roadmap}")
        if queues.depth(queues.queue_url) > MESSAGES_PER_TICK * 60 // TICK_MINUTES:
            deep_ticks += 1  # more than a claim lease (60 minutes) of work waiting
        work(queues, worker, MESSAGES_PER_TICK)
        let_time_pass(db, queues, TICK_MINUTES)
        if tick and queues.depth(queues.queue_url) == 0:
            break

    # THEN the queue stayed deeper than a lease of work for over six hours...
    later_statements = sorted({statements for *_, statements in sweeps[1:]})
    print(
        "\nbacklog figures: "
        + json.dumps(
            {
                "items": items,
                "hours_deeper_than_a_lease_of_work": deep_ticks * TICK_MINUTES / 60,
                "simulated_hours_to_drain": len(sweeps) * TICK_MINUTES / 60,
                "sweeps": len(sweeps),
                "first_sweep": {"roadmaps_planned": sweeps[0][2].roadmaps_planned},
                "statements_per_later_sweep": later_statements,
                "owner_requests": len(sweeps) * OWNERS_ASKING_PER_TICK,
                "items_replanned_by_owners": replanned_by_owners,
                "messages_per_item": queues.sent[queues.queue_url] / items,
                "llm_calls_per_item": len(generator.calls) / items,
                "expired_in_queue": len(queues.expired),
            }
        )
    )
    assert deep_ticks * TICK_MINUTES >= 6 * 60
    # ...the first sweep planned every roadmap in one run (no fixed cap of 50)...
    first = sweeps[0][2]
    assert (first.roadmaps_planned, first.retried_count, first.backlog) == (ROADMAPS, items, 0)
    # ...and every later one found nothing to judge, at the same cost, however deep the queue
    later = sweeps[1:]
    assert all(outcome.roadmaps_scanned == 0 for _, _, outcome, _ in later)
    assert len({statements for *_, statements in later}) == 1, [s for *_, s in later]
    assert replanned_by_owners == 0
    # every item saved exactly once; a message per item, an LLM call per item
    with db.connect() as connection:
        versions = connection.execute(
            text("SELECT count(*), count(DISTINCT (roadmap_id, concept_id)) FROM tutorials")
        ).one()
    assert tuple(versions) == (items, items)
    assert queues.sent[queues.queue_url] / items <= 1.05
    assert len(generator.calls) / items <= 1.02
    # and nothing expired, in the queue or in the ledger
    assert queues.expired == []
    assert all(outcome.claims_expired == 0 for _, _, outcome, _ in sweeps)
    assert queues.depth(queues.dlq_url) == 0


class RunningOutOfTime(FakeLambdaContext):
    """A detect invocation whose time runs out after ``calls`` checks of it."""

    def __init__(self, calls: int, reserve: int) -> None:
        super().__init__()
        self.calls, self.reserve = calls, reserve

    def get_remaining_time_in_millis(self) -> int:  # type: ignore[override]
        self.calls -= 1
        return (self.reserve + 1) * 1000 if self.calls >= 0 else 0


def test_the_sweep_plans_what_its_time_allows_and_reports_the_rest(
    db: Engine, connection: Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 30 roadmaps needing work, and a sweep whose invocation has time for 12
    seed_incident(connection, roadmaps=30)
    queues = SimulatedQueues()
    settings = Settings(
        DATABASE_URL=str(db.url.render_as_string(hide_password=False)),
        RETRY_QUEUE_URL=queues.queue_url,
        RETRY_DLQ_URL=queues.dlq_url,
    )
    detect = detect_deps(db, queues, settings)
    context = RunningOutOfTime(calls=12, reserve=settings.sweep_reserve_seconds)
    capsys.readouterr()

    # WHEN the schedule fires, then once more with time enough
    first = detect_handler(load_event("schedule-sweep.json"), context, deps=detect)
    emitted = capsys.readouterr().out
    second = detect_handler(load_event("schedule-sweep.json"), FakeLambdaContext(), deps=detect)

    # THEN the first planned 12 and reported 18 left (SweepBacklog); the second the rest
    assert (first["roadmaps_planned"], second["roadmaps_planned"]) == (12, 18)
    backlog = [
        json.loads(line)["SweepBacklog"]
        for line in emitted.splitlines()
        if line.startswith("{") and "SweepBacklog" in line
    ]
    assert backlog == [18.0] or backlog == [[18.0]]
    assert queues.depth(queues.queue_url) == 30 * CONCEPTS


def test_a_message_that_outlives_the_queues_retention_is_seen_and_planned_again(
    db: Engine, connection: Connection
) -> None:
    # GIVEN a roadmap planned, its messages sent, and nobody working the queue
    seed_incident(connection, roadmaps=1)
    queues = SimulatedQueues()
    settings = Settings(
        DATABASE_URL=str(db.url.render_as_string(hide_password=False)),
        RETRY_QUEUE_URL=queues.queue_url,
        RETRY_DLQ_URL=queues.dlq_url,
        RETRY_QUEUE_RETENTION_MINUTES=str(RETENTION_SECONDS // 60),
    )
    detect = detect_deps(db, queues, settings)
    generator = CountingGenerator()
    worker = worker_deps(db, queues, generator, settings)
    first = sweep(detect)
    first_task = first.task_ids[0]

    # WHEN the queue's retention passes: SQS drops the messages, unprocessed
    let_time_pass(db, queues, RETENTION_SECONDS // 60 + 60)
    assert queues.depth(queues.queue_url) == 0
    again = sweep(detect)
    work(queues, worker, CONCEPTS)

    # THEN the sweep saw it (the claims ended, with why) and planned them again,
    # and each item was then saved once
    assert len(queues.expired) == CONCEPTS
    assert (again.claims_expired, again.retried_count) == (CONCEPTS, CONCEPTS)
    with db.connect() as check:
        old = check.execute(
            text("SELECT DISTINCT status, last_error FROM retry_items WHERE task_id = :t"),
            {"t": first_task},
        ).all()
        saved = check.execute(text("SELECT count(*) FROM tutorials")).scalar_one()
    assert [row.status for row in old] == ["failed"]
    assert "longer than its retention" in old[0].last_error
    assert saved == CONCEPTS
    assert len(generator.calls) == CONCEPTS
