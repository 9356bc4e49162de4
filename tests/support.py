"""What the tests share: fakes of what the pipeline talks to, and small helpers.

Fakes over mocks: each stands in for one interface the pipeline owns (a
content generator) or one AWS call it makes (SendMessageBatch), and behaves
like the real thing except for the fault it is told to inject.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext
from sqlalchemy import Engine, text

from content_retry.aws import bedrock_runtime_client, client
from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.database import get_engine
from content_retry.generators import NO_USAGE, Generation, Usage, get_generator
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import Preferences
from content_retry.retries import DetectDependencies
from content_retry.settings import Settings, get_settings
from content_retry.worker import WorkerDependencies

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def logged_events() -> Iterator[list[dict[str, Any]]]:
    """The handlers' log lines while the block runs, as the JSON Lambda would get.

    Formatted when logged (the context keys live in the formatter only while
    their block runs); the logger's own stream was bound before any capture.
    """
    from content_retry.observability import logger

    lines: list[dict[str, Any]] = []
    formatter = logger.registered_formatter

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(formatter.format(record)))

    handler = Collect()
    target = logging.getLogger(logger.name)
    target.addHandler(handler)
    try:
        yield lines
    finally:
        target.removeHandler(handler)


def load_event(name: str) -> dict[str, Any]:
    """The JSON of ``events/NAME`` (the same files ``sam local invoke -e`` takes)."""
    event: dict[str, Any] = json.loads((REPO_ROOT / "events" / name).read_text())
    return event


def sqs_event(bodies: Iterable[str]) -> dict[str, Any]:
    """An SQS event shaped like events/sqs-retry-batch.json, carrying these bodies."""
    template = load_event("sqs-retry-batch.json")["Records"][0]
    records = []
    for number, body in enumerate(bodies):
        record = copy.deepcopy(template)
        record["messageId"] = f"message-{number}"
        record["body"] = body
        records.append(record)
    return {"Records": records}


def redriven_event(messages: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """An SQS event of dead-lettered messages moved back as a re-drive moves them:
    body and message attributes kept (``messages`` as ReceiveMessage gives them)."""
    from content_retry_local.lambda_runtime import sqs_record

    return {
        "Records": [
            sqs_record(m["Body"], f"redriven-{n}", message_attributes=m.get("MessageAttributes"))
            for n, m in enumerate(messages)
        ]
    }


def holds_expire(engine: Engine) -> None:
    """Time passes: the invocations that held running items have ended (their
    deadlines passed), as they have by the time SQS redelivers or a re-drive
    comes, minutes later."""
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE retry_items SET delivery_until = now() WHERE delivery_until > now()")
        )


def reset_process_caches() -> None:
    """Forget the process's settings, clients, engine and generator (they are
    created on first use from the environment, which a test just changed)."""
    get_settings.cache_clear()
    client.cache_clear()
    bedrock_runtime_client.cache_clear()
    get_generator.cache_clear()
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()


class FakeLambdaContext(LambdaContext):
    """What the Lambda runtime passes as ``context``; the time left is settable."""

    def __init__(self, remaining_ms: int = 300_000) -> None:
        self._function_name = "content-retry-test"
        self._function_version = "$LATEST"
        self._invoked_function_arn = (
            "arn:aws:lambda:us-east-1:123456789012:function:content-retry-test"
        )
        self._memory_limit_in_mb = 512
        self._aws_request_id = "00000000-0000-4000-8000-000000000000"
        self._log_group_name = "/aws/lambda/content-retry-test"
        self._log_stream_name = "2026/11/28/[$LATEST]test"
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:  # type: ignore[override]
        return self.remaining_ms


def no_sleep(seconds: float) -> None:
    """Backoff that does not wait: tests inject failures, not slowness."""


class CountingGenerator:
    """The template generator, counting its calls; chosen items fail or run a hook.

    Safe to call from the worker's threads. Attributes:
        calls: (concept id, content type) of every call, in the order they began.
        failures: the exception an item raises instead of answering.
        before_call: run before every call (say, to cut a connection).
        hold: seconds each call takes (a model answering), so calls overlap.
        max_in_flight: the most calls that were running at once.
        usage: what each call reports it cost.
    """

    name = "counting"

    def __init__(self, *, hold: float = 0.0, usage: Usage = NO_USAGE) -> None:
        self.calls: list[tuple[str, str]] = []
        self.failures: dict[tuple[str, str], Exception] = {}
        self.before_call: Callable[[str, str], object] | None = None
        self.hold = hold
        self.usage = usage
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._template = TemplateGenerator()

    def generate(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> Generation:
        key = (concept.concept_id, content_type.value)
        with self._lock:
            self.calls.append(key)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.before_call:
                self.before_call(*key)
            if self.hold:
                time.sleep(self.hold)
            if key in self.failures:
                raise self.failures[key]
            content = self._template.generate(concept, content_type, preferences).content
            return Generation(content, self.usage)
        finally:
            with self._lock:
                self._in_flight -= 1


@dataclass
class FlakySqs:
    """An SQS client whose SendMessageBatch fails the entries ``fails(body)`` picks.

    Failed entries are reported the way SQS reports them (``Failed`` with a
    code), so the sender's resend and release paths run. Every other call goes
    to the real (moto) client. ``crash`` makes SendMessageBatch stop the
    process instead, as a function killed between its commit and its send.
    """

    sqs: Any
    fails: Callable[[dict[str, Any]], bool] = lambda body: False
    crash: bool = False
    batch_calls: int = 0
    failed_entries: int = field(default=0)

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:
        self.batch_calls += 1
        if self.crash:
            raise SystemExit("the function was stopped between commit and send")
        failed = [entry for entry in Entries if self.fails(json.loads(entry["MessageBody"]))]
        self.failed_entries += len(failed)
        sent = [entry for entry in Entries if entry not in failed]
        response = self.sqs.send_message_batch(QueueUrl=QueueUrl, Entries=sent) if sent else {}
        return {
            "Successful": response.get("Successful", []),
            "Failed": [
                {"Id": entry["Id"], "SenderFault": False, "Code": "InternalError", "Message": "x"}
                for entry in failed
            ],
        }

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sqs, name)


def detect_deps(engine: Engine, sqs: Any, settings: Settings | None = None) -> DetectDependencies:
    """The detect function's dependencies: the test database, an SQS client, settings
    from the environment (``queues`` sets the queue URLs), and no backoff waits."""
    return DetectDependencies(
        engine=engine, sqs=sqs, settings=settings or get_settings(), sleep=no_sleep
    )


def worker_deps(
    engine: Engine, sqs: Any, generator: Any, settings: Settings | None = None
) -> WorkerDependencies:
    """The generate function's dependencies, with the given generator."""
    return WorkerDependencies(
        engine=engine, sqs=sqs, settings=settings or get_settings(), generator=generator
    )
