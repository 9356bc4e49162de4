"""detect at scale (issue 20): batches split by count and bytes, sends recorded
batch by batch, sent concurrently, within the API's time and memory.

Real PostgreSQL and moto's SQS with the queues of template.yaml. Two wrappers
of moto's client stand in for what moto does not do as SQS does: counting a
batch in UTF-8 bytes (moto counts characters), and answering after a latency
while taking each message out of the queue as a consumer would (moto's
SendMessage walks its whole queue for every message it adds, so thousands of
messages left in it would take minutes).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from content_retry import api, queue
from content_retry.queue import OutgoingMessage, send_retry_messages
from content_retry.repositories import claims
from content_retry.retries import DetectDependencies, start_retry
from content_retry_local.seed import ConceptSeed, build_framework, insert_roadmap
from functions.detect.app import lambda_handler
from tests.conftest import FakeLambdaContext, Queues, StatementCounter
from tests.support import detect_deps, load_event

MIB = 1_048_576
ROADMAP_ID = "scale-roadmap"
USER_ID = "u-scale"
# Each escaped by JSON as six characters (\u0001), and a character UTF-8 writes in four bytes.
ESCAPED = "\x01"
FOUR_BYTES = "\N{GRINNING FACE}"


def concepts(count: int, text_: str = "", length: int = 0) -> list[ConceptSeed]:
    return [
        ConceptSeed(f"c{number:05d}", f"Concept {number}", text_ * length or f"About {number}")
        for number in range(count)
    ]


def add_roadmap(db: Engine, seeds: list[ConceptSeed], *, long_names: str = "") -> None:
    """A roadmap of ``seeds`` whose tutorials were all lost; its stage and
    module named by ``long_names`` (10,000 characters: the concept's limit) if given."""
    stage, module = (long_names * 10_000, long_names * 10_000) if long_names else ("S", "M")
    with db.begin() as connection:
        insert_roadmap(
            connection, ROADMAP_ID, USER_ID, build_framework([(stage, [(module, seeds)])])
        )


def retry_event() -> dict[str, Any]:
    event = copy.deepcopy(load_event("api-retry.json"))
    event["path"] = f"/roadmaps/{ROADMAP_ID}/retry"
    event["pathParameters"] = {"roadmap_id": ROADMAP_ID}
    event["requestContext"]["authorizer"] = {"claims": {"sub": USER_ID}}
    return event


def respond(deps: DetectDependencies, context: FakeLambdaContext) -> tuple[int, dict[str, Any]]:
    response = lambda_handler(retry_event(), context, deps=deps)
    return response["statusCode"], json.loads(response["body"])


def retry(deps: DetectDependencies) -> int:
    return start_retry(deps, ROADMAP_ID, content_types=["tutorial"], trigger="api").retried_count


def marked_sent(db: Engine) -> set[str]:
    with db.connect() as connection:
        rows = connection.execute(
            text("SELECT concept_id FROM retry_items WHERE sent_at IS NOT NULL")
        ).all()
    return {row.concept_id for row in rows}


def items_by_status(db: Engine) -> dict[str, int]:
    with db.connect() as connection:
        rows = connection.execute(
            text("SELECT status, count(*) FROM retry_items GROUP BY status")
        ).all()
    return dict(rows)


def lease_passes(db: Engine) -> None:
    with db.begin() as connection:
        connection.execute(
            text("UPDATE retry_items SET claimed_at = claimed_at - interval '61 minutes'")
        )


def bytes_of(entry: dict[str, Any]) -> int:
    """A batch entry's size as SQS counts it."""
    size = len(entry["MessageBody"].encode())
    for name, attribute in entry.get("MessageAttributes", {}).items():
        size += len(name.encode()) + len(attribute["DataType"].encode())
        size += len(attribute.get("StringValue", "").encode())
    return size


class SqsCountingBytes:
    """moto's SQS whose SendMessageBatch refuses a batch over 1 MiB in UTF-8
    bytes with attributes, as SQS does (moto counts the bodies' characters).
    Records each call's entries and bytes."""

    def __init__(self, sqs: Any) -> None:
        self.sqs = sqs
        self.batches: list[tuple[int, int]] = []  # (entries, bytes) of each call
        self._lock = threading.Lock()

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        size = sum(bytes_of(entry) for entry in Entries)
        with self._lock:
            self.batches.append((len(Entries), size))
            if size > MIB:
                raise ClientError(
                    {
                        "Error": {
                            "Code": "AWS.SimpleQueueService.BatchRequestTooLong",
                            "Message": f"Batch requests cannot be longer than {MIB} bytes",
                        }
                    },
                    "SendMessageBatch",
                )
            response: dict[str, Any] = self.sqs.send_message_batch(
                QueueUrl=QueueUrl, Entries=Entries
            )
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sqs, name)


class SqsAnsweringIn:
    """moto's SQS answering SendMessageBatch after ``latency``, taking what it
    queued out of the queue at once (``received``: concept ids, in order).

    ``refuse_once`` names concepts whose first send SQS reports failed;
    ``crash_after`` calls, a call stops the process instead (``crash``),
    before it reaches SQS. Counts the calls in flight at once. :meth:`stop`
    ends the calls still waiting (those detect gave up on), unsent.
    """

    def __init__(
        self,
        sqs: Any,
        *,
        latency: float = 0.0,
        refuse_once: Callable[[str], bool] = lambda concept_id: False,
        crash_after: int | None = None,
        crash: type[BaseException] = SystemExit,
    ) -> None:
        self.sqs, self.latency, self.refuse_once = sqs, latency, refuse_once
        self.crash_after, self.crash = crash_after, crash
        self.received: list[str] = []
        self.calls = self.in_flight = self.most_in_flight = 0
        self._refused: set[str] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
            if self.crash_after is not None and self.calls > self.crash_after:
                raise self.crash("the function was stopped in the middle of its send")
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self._stopped.wait(self.latency):
                raise ConnectionError("the test ended before SQS answered")
            return self._send(QueueUrl, Entries)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _send(self, queue_url: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        concept_of = {
            e["Id"]: json.loads(e["MessageBody"])["concept"]["concept_id"] for e in entries
        }
        with self._lock:
            refused = [
                e
                for e in entries
                if concept_of[e["Id"]] not in self._refused
                and self.refuse_once(concept_of[e["Id"]])
            ]
            self._refused.update(concept_of[e["Id"]] for e in refused)
            sent = [e for e in entries if e not in refused]
            response = self.sqs.send_message_batch(QueueUrl=queue_url, Entries=sent)
            self.received += [concept_of[s["Id"]] for s in response.get("Successful", [])]
            self.sqs.purge_queue(QueueUrl=queue_url)
        return {
            "Successful": response.get("Successful", []),
            "Failed": [
                *response.get("Failed", []),
                *(
                    {
                        "Id": e["Id"],
                        "SenderFault": False,
                        "Code": "InternalError",
                        "Message": "try again",
                    }
                    for e in refused
                ),
            ],
        }

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sqs, name)


class RunningDownContext(FakeLambdaContext):
    """A Lambda context whose remaining time runs down with the real clock."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._ends = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:  # type: ignore[override]
        return max(0, int((self._ends - time.monotonic()) * 1000))


@pytest.fixture(autouse=True)
def purge_at_will(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's setting: PurgeQueue as often as asked (SQS allows one a minute),
    so SqsAnsweringIn can empty the queue after each call."""
    monkeypatch.setenv("MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR", "false")


@pytest.fixture
def short_api_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's cap at 3 s, 1 s kept to answer: 2 s of work."""
    monkeypatch.setattr(api, "API_AT_MOST_SECONDS", 3.0)
    monkeypatch.setattr(api, "API_RESERVE_SECONDS", 1.0)


@pytest.fixture
def patient_api_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The API's cap at 120 s: these tests count what is sent, not how fast (B10
    does), and a machine shared with other test runs may take longer than 27 s."""
    monkeypatch.setattr(api, "API_AT_MOST_SECONDS", 120.0)


# --- batches split by count and by bytes -----------------------------------------------------


def test_ten_messages_over_a_mebibyte_together_are_queued_in_batches_under_it(
    db: Engine, queues: Queues, lambda_context: FakeLambdaContext
) -> None:
    # GIVEN ten concepts whose texts are at the concept's limits in characters
    # JSON escapes as six: each message is 180 KB, the ten 1.8 MB together,
    # which SQS (and moto) refuse in one SendMessageBatch
    add_roadmap(db, concepts(10, ESCAPED, 10_000), long_names=ESCAPED)
    sqs = SqsCountingBytes(queues.sqs)

    # WHEN the owner asks for the retry
    status, body = respond(detect_deps(db, sqs), lambda_context)

    # THEN all ten are queued, in batches SQS accepts (before: 503, every time)
    assert (status, body["retried_count"]) == (202, 10)
    assert sorted(json.loads(m["Body"])["concept"]["concept_id"] for m in queues.receive_all()) == [
        f"c{number:05d}" for number in range(10)
    ]
    assert len(sqs.batches) >= 2
    assert all(size <= MIB for _, size in sqs.batches)
    assert sum(entries for entries, _ in sqs.batches) == 10


def test_batches_are_split_by_utf8_bytes_as_sqs_counts_them(
    db: Engine, queues: Queues, lambda_context: FakeLambdaContext
) -> None:
    # GIVEN ten messages of 120 KB in UTF-8 (30,000 characters of four bytes
    # each): 1.2 MB together, though 300,000 characters
    add_roadmap(db, concepts(10, FOUR_BYTES, 10_000), long_names=FOUR_BYTES)
    sqs = SqsCountingBytes(queues.sqs)

    status, body = respond(detect_deps(db, sqs), lambda_context)

    assert (status, body["retried_count"]) == (202, 10)
    assert queues.depth() == 10
    assert [size <= MIB for _, size in sqs.batches] == [True] * len(sqs.batches)
    assert sum(size for _, size in sqs.batches) > MIB  # one batch would have been refused


def _message(
    concept_id: str, size: int, attributes: dict[str, Any] | None = None
) -> OutgoingMessage:
    body = json.dumps({"concept": {"concept_id": concept_id}, "pad": ""})
    return OutgoingMessage(
        concept_id, (body[:-2] + "x" * (size - len(body)) + '"}').encode(), attributes
    )


@pytest.mark.parametrize(
    ("sizes", "batches"),
    [
        ([100] * 25, [10, 10, 5]),  # by count
        ([600_000, 500_000], [1, 1]),  # by bytes
        ([400_000, 400_000, 248_576, 1], [3, 1]),  # exactly 1 MiB fits
        ([MIB, 10, 10], [1, 2]),  # one message of 1 MiB is a batch of its own
    ],
)
def test_send_splits_batches_by_count_and_bytes(
    queues: Queues, sizes: list[int], batches: list[int]
) -> None:
    sqs = SqsCountingBytes(queues.sqs)
    messages = [_message(f"c{number}", size) for number, size in enumerate(sizes)]

    result = send_retry_messages(sqs, queues.queue_url, messages, concurrency=1)

    assert [entries for entries, _ in sqs.batches] == batches
    assert (sorted(result.sent), result.failed) == (sorted(m.concept_id for m in messages), {})


def test_message_attributes_count_against_the_limit(queues: Queues) -> None:
    attributes = {"reason": {"DataType": "String", "StringValue": "x" * 100_000}}
    messages = [_message("c1", 500_000, attributes), _message("c2", 500_000, attributes)]
    sqs = SqsCountingBytes(queues.sqs)

    result = send_retry_messages(sqs, queues.queue_url, messages)

    assert [entries for entries, _ in sqs.batches] == [1, 1]
    assert sorted(result.sent) == ["c1", "c2"]


def test_a_message_over_the_limit_fails_alone_with_why(queues: Queues) -> None:
    # GIVEN a message one byte over SQS's limit between two small ones
    messages = [_message("small-1", 100), _message("huge", MIB + 1), _message("small-2", 100)]
    sqs = SqsCountingBytes(queues.sqs)

    # WHEN they are sent
    result = send_retry_messages(sqs, queues.queue_url, messages)

    # THEN the huge one fails on its own, saying why; the others go, in one call
    assert result.failed == {
        "huge": "the message is 1,048,577 bytes, over SQS's limit of 1,048,576 bytes "
        "for one message: not sent"
    }
    assert sorted(result.sent) == ["small-1", "small-2"]
    assert sqs.batches == [(2, sum(len(m.body) for m in messages if m.concept_id != "huge"))]


def test_a_concepts_message_over_the_limit_releases_its_claim_with_why(
    db: Engine, queues: Queues, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a limit of 50 KB a message (the models keep real messages far below
    # SQS's 1 MiB), and one concept whose message is 60 KB
    monkeypatch.setattr(queue, "MAX_MESSAGE_BYTES", 50_000)
    seeds = [*concepts(3), ConceptSeed("big", "Big", ESCAPED * 10_000)]
    add_roadmap(db, seeds)
    deps = detect_deps(db, queues.sqs)

    outcome = start_retry(deps, ROADMAP_ID, content_types=["tutorial"], trigger="api")

    # THEN the other three are queued; its claim is released with the reason
    assert (outcome.retried_count, outcome.unsent_count) == (3, 1)
    assert queues.depth() == 3
    with db.connect() as connection:
        status, error = connection.execute(
            text("SELECT status, last_error FROM retry_items WHERE concept_id = 'big'")
        ).one()
    assert status == "failed"
    assert "over SQS's limit of 50,000 bytes for one message" in error


# --- sends recorded batch by batch -----------------------------------------------------------


@pytest.mark.parametrize("crash", [SystemExit, RuntimeError])
def test_a_crash_mid_send_leaves_exactly_the_sent_ones_marked(
    db: Engine, queues: Queues, crash: type[BaseException]
) -> None:
    # GIVEN 300 lost tutorials, and a detect run that dies at its 13th SQS call
    add_roadmap(db, concepts(300))
    sqs = SqsAnsweringIn(queues.sqs, latency=0.01, crash_after=12, crash=crash)
    deps = detect_deps(db, sqs)

    # WHEN it starts the retry
    with pytest.raises(crash):
        retry(deps)

    # THEN exactly the concepts it queued are marked sent, no more, no fewer
    sent = set(sqs.received)
    assert 0 < len(sent) < 300
    assert len(sqs.received) == len(sent)
    assert marked_sent(db) == sent
    # AND while the claims are live nothing is planned twice; once the lease
    # has passed, only the concepts never sent are planned again
    sqs = SqsAnsweringIn(queues.sqs)
    deps.sqs = sqs
    assert retry(deps) == 0
    lease_passes(db)
    assert retry(deps) == 300 - len(sent)
    assert set(sqs.received).isdisjoint(sent)
    assert sorted([*sent, *sqs.received]) == [f"c{number:05d}" for number in range(300)]


def test_the_deadline_mid_send_records_the_sent_and_releases_the_rest(
    db: Engine, queues: Queues, short_api_deadline: None
) -> None:
    # GIVEN 3,000 lost tutorials, SQS answering in 100 ms a call (300 calls:
    # 3 s at 10 at once), and the API's 2 s of work
    add_roadmap(db, concepts(3_000))
    sqs = SqsAnsweringIn(queues.sqs, latency=0.1)
    deps = detect_deps(db, sqs)

    # WHEN the owner asks for the retry
    started = time.monotonic()
    status, body = respond(deps, RunningDownContext(28))
    elapsed = time.monotonic() - started

    # THEN the answer comes before the deadline, saying what was queued
    sent = set(sqs.received)
    assert elapsed < 3.0
    assert 0 < len(sent) < 3_000
    assert (status, body["retried_count"]) == (202, len(sent))
    assert "will be planned again by the next request or sweep" in body["message"]
    # AND exactly those are marked sent; the others' claims are released, with why
    assert marked_sent(db) == sent
    assert items_by_status(db) == {"queued": len(sent), "failed": 3_000 - len(sent)}
    with db.connect() as connection:
        errors = (
            connection.execute(
                text("SELECT DISTINCT last_error FROM retry_items WHERE status = 'failed'")
            )
            .scalars()
            .all()
        )
    assert len(errors) == 1 and "the invocation's time ran out" in errors[0]
    # AND the next request plans exactly the rest, at once
    sqs = SqsAnsweringIn(queues.sqs)
    deps.sqs = sqs
    assert retry(deps) == 3_000 - len(sent)
    assert sorted([*sent, *sqs.received]) == [f"c{number:05d}" for number in range(3_000)]


def test_sqs_that_stops_answering_cannot_hold_the_answer_past_the_deadline(
    db: Engine, queues: Queues, short_api_deadline: None
) -> None:
    # GIVEN SQS that takes 5 s to answer a call, beyond the API's 2 s of work
    add_roadmap(db, concepts(30))
    sqs = SqsAnsweringIn(queues.sqs, latency=5)
    deps = detect_deps(db, sqs)

    started = time.monotonic()
    status, body = respond(deps, RunningDownContext(28))
    elapsed = time.monotonic() - started
    sqs.stop()

    # THEN the API answers in time: nothing confirmed queued, claims left to their lease
    assert elapsed < 3.0
    assert (status, body["retried_count"], body["success"]) == (503, 0, False)
    assert "were being sent when the time ran out" in body["message"]
    assert items_by_status(db) == {"queued": 30}
    assert marked_sent(db) == set()


# --- sent concurrently, each once --------------------------------------------------------------


def test_a_5000_concept_retry_sends_every_message_exactly_once(
    db: Engine,
    queues: Queues,
    lambda_context: FakeLambdaContext,
    count_statements: StatementCounter,
    patient_api_deadline: None,
) -> None:
    # GIVEN 5,000 lost tutorials, SQS answering in 15 ms a call, and refusing
    # every 97th concept's first send (it is sent again)
    add_roadmap(db, concepts(5_000))
    sqs = SqsAnsweringIn(
        queues.sqs, latency=0.015, refuse_once=lambda concept_id: int(concept_id[1:]) % 97 == 0
    )

    # WHEN the owner asks for the retry
    with count_statements:
        status, body = respond(detect_deps(db, sqs), lambda_context)

    # THEN every concept was queued exactly once, whatever the order
    assert (status, body["retried_count"]) == (202, 5_000)
    assert Counter(sqs.received) == Counter(f"c{number:05d}" for number in range(5_000))
    assert sqs.calls == 500 + 52  # the 52 refused entries, each resent with its batch's
    # AND the calls were made at once, as many as the client's connections
    assert 1 < sqs.most_in_flight <= queue.SEND_CONCURRENCY
    # AND every item is marked sent, in a few statements, not one per batch
    assert len(marked_sent(db)) == 5_000
    marks = [s for s in count_statements.statements if "SET sent_at" in s]
    assert 2 <= len(marks) <= 20


def test_a_group_the_database_fails_to_record_is_recorded_at_the_end(
    db: Engine,
    queues: Queues,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    patient_api_deadline: None,
) -> None:
    # GIVEN 2,500 lost tutorials (three groups to record), and a database that
    # fails the first group's record
    add_roadmap(db, concepts(2_500))
    sqs = SqsAnsweringIn(queues.sqs)
    mark_sent = claims.mark_sent
    calls: list[int] = []

    def failing_once(connection: Connection, task_id: str, concept_ids: list[str]) -> None:
        calls.append(len(concept_ids))
        if len(calls) == 1:
            raise OperationalError("UPDATE retry_items", {}, ConnectionResetError("reset"))
        mark_sent(connection, task_id, concept_ids)

    monkeypatch.setattr(claims, "mark_sent", failing_once)

    # WHEN the retry is sent
    assert retry(detect_deps(db, sqs)) == 2_500

    # THEN every sent concept is marked all the same, by the send's last record
    assert marked_sent(db) == set(sqs.received) and len(sqs.received) == 2_500
    assert len(calls) == 2 and calls[1] == 2_500
    assert "retry_sends_record_deferred" in [record.msg for record in caplog.records]
