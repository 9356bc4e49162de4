"""B4: SQS API calls per planned item when detect enqueues a 2,000-concept roadmap.

What it measures: every SQS API call ``content_retry.retries.start_retry``
makes (counted with a botocore ``before-call.sqs.*`` hook on the client it is
given, moto's SQS in the process), divided by the items it planned. The
roadmap lost every tutorial, so each concept is one message of one item: the
worst case for calls per item (a concept with three items still takes one
message).

Why the baseline is fair: the baseline is the least any sender could do,
one ``SendMessageBatch`` per 10 messages (SQS's limit), computed from the
same plan; the ratio calls / minimum is 1.00 when nothing is wasted. The
database statements detect issued are shown too (engine events).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from typing import Any

from moto import mock_aws

from benchmarks.data import add_lost_tutorials_roadmap
from benchmarks.harness import BenchEnv, EngineCounter, Result, quiet_powertools, say, settings_for
from content_retry.database import build_engine
from content_retry.queue import BATCH_SIZE
from content_retry.retries import DetectDependencies, start_retry
from content_retry_local.template import create_queues

ID = "B4"
WHAT = "detect: SQS API calls per planned item, 2,000-concept roadmap"
GOAL = "<=0.11 calls/item"
ROADMAP_ID = "sqs-bench"
CONCEPTS = 2_000


class CallCounter:
    """Counts a boto3 client's API calls by operation, from botocore's events."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: Counter[str] = Counter()

    def _before_call(self, model: Any, **kwargs: Any) -> None:
        self.calls[model.name] += 1

    def __enter__(self) -> CallCounter:
        self.client.meta.events.register("before-call.sqs.*", self._before_call)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.meta.events.unregister("before-call.sqs.*", self._before_call)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class Consumer:
    """Receives and deletes what each SendMessageBatch delivered, right after it,
    through a second client whose calls are not counted.

    moto's SendMessage walks every message already in the queue, so 2,000
    messages left in it make the run quadratic (half a minute); kept drained,
    it is linear. Counting what arrives also checks every message was sent.
    """

    def __init__(self, sender: Any, receiver: Any, queue_url: str) -> None:
        self.sender, self.receiver, self.queue_url = sender, receiver, queue_url
        self.received = 0
        # detect sends batches from several threads at once: one drain at a time.
        self._lock = threading.Lock()

    def _after_send(self, **kwargs: Any) -> None:
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        while True:
            messages = self.receiver.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
            ).get("Messages", [])
            if not messages:
                return
            self.received += len(messages)
            self.receiver.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]}
                    for n, m in enumerate(messages)
                ],
            )

    def __enter__(self) -> Consumer:
        self.sender.meta.events.register("after-call.sqs.SendMessageBatch", self._after_send)
        return self

    def __exit__(self, *exc: object) -> None:
        self.sender.meta.events.unregister("after-call.sqs.SendMessageBatch", self._after_send)


def run(env: BenchEnv) -> Result:
    url = env.postgres.create_database("bench_b4")
    engine = build_engine(settings_for(url), pool_size=1)
    try:
        with engine.begin() as connection:
            add_lost_tutorials_roadmap(connection, ROADMAP_ID, CONCEPTS)
        with mock_aws():
            import boto3

            sqs = boto3.client("sqs", region_name="us-east-1")
            queue_url, dlq_url = create_queues(sqs)
            deps = DetectDependencies(
                engine=engine,
                sqs=sqs,
                settings=settings_for(url, RETRY_QUEUE_URL=queue_url, RETRY_DLQ_URL=dlq_url),
            )
            receiver = boto3.client("sqs", region_name="us-east-1")
            with (
                quiet_powertools(),
                Consumer(sqs, receiver, queue_url) as consumer,
                CallCounter(sqs) as calls,
                EngineCounter(engine) as statements,
            ):
                outcome = start_retry(deps, ROADMAP_ID, trigger="invoke")
            queued = consumer.received
    finally:
        engine.dispose()

    items, messages = outcome.retried_count, outcome.messages_sent
    assert items == CONCEPTS, items
    assert messages == queued == CONCEPTS, (messages, queued)
    minimum = math.ceil(messages / BATCH_SIZE)
    per_item = calls.total / items
    say(
        f"{items:,} items in {messages:,} messages: {calls.total} SQS calls "
        f"({', '.join(f'{name} {count}' for name, count in calls.calls.items())}); "
        f"minimum {minimum}: ratio {calls.total / minimum:.2f}"
    )
    say(f"{per_item:.3f} calls per item (goal <= 0.11)")
    say(
        f"database: {len(statements.statements)} statements, {statements.begins} BEGIN, "
        f"{statements.commits} COMMIT, {statements.checkouts} checkouts for the whole roadmap"
    )
    return Result(
        ID,
        WHAT,
        GOAL,
        f"{per_item:.3f} calls/item ({calls.total} calls, {calls.total / minimum:.2f}x the "
        f"minimum of {minimum})",
        per_item <= 0.11,
    )
