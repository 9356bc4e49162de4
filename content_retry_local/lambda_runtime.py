"""What Lambda does around the handlers, done locally: invoke, the SQS poller, re-drive.

The handlers are the deployed ``functions/*/app.py``, loaded from their files;
this module only builds their events and contexts, as Lambda would.
"""

from __future__ import annotations

import importlib.util
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from content_retry_local.project import project_root
from content_retry_local.template import resource

FUNCTIONS = {"detect": "DetectFunction", "generate": "GenerateFunction"}

Handler = Callable[..., Any]


@dataclass
class LocalLambdaContext:
    """The ``context`` Lambda passes: names, request id, and a deadline."""

    function_name: str
    timeout_seconds: int
    memory_limit_in_mb: int = 512
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:000000000000:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        elapsed = time.monotonic() - self.started
        return max(0, int((self.timeout_seconds - elapsed) * 1000))


def context_for(function: str) -> LocalLambdaContext:
    """A fresh context for one invocation, with the template's timeout."""
    properties = resource(FUNCTIONS[function])["Properties"]
    return LocalLambdaContext(
        function_name=f"content-retry-{function}-local",
        timeout_seconds=int(properties.get("Timeout", 3)),
        memory_limit_in_mb=int(properties.get("MemorySize", 512)),
    )


@cache
def load_handler(function: str) -> Handler:
    """The handler template.yaml names for ``detect`` or ``generate``, from its file.

    Raises:
        ValueError: not one of the two functions.
    """
    if function not in FUNCTIONS:
        raise ValueError(f"unknown function {function!r}; choose one of: {', '.join(FUNCTIONS)}")
    properties = resource(FUNCTIONS[function])["Properties"]
    module_name, attribute = properties["Handler"].rsplit(".", 1)
    path = project_root() / properties["CodeUri"] / f"{module_name}.py"
    spec = importlib.util.spec_from_file_location(f"content_retry_handler_{function}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler: Handler = getattr(module, attribute)
    return handler


def invoke(function: str, event: Any, deps: Any = None) -> Any:
    """Invoke a handler once, as ``sam local invoke -e`` would.

    Args:
        deps: the handler's dependencies, when not the process's own (the demo
            passes a generator that counts its calls and stages a fault).
    """
    handler = load_handler(function)
    if deps is None:
        return handler(event, context_for(function))
    return handler(event, context_for(function), deps=deps)


LOCAL_QUEUE_ARN = "arn:aws:sqs:us-east-1:000000000000:content-retry-local"


def sqs_record(
    body: str,
    message_id: str,
    *,
    receipt_handle: str = "local",
    receive_count: int | str = 1,
    message_attributes: dict[str, Any] | None = None,
    queue_arn: str = LOCAL_QUEUE_ARN,
) -> dict[str, Any]:
    """One record of an SQS event, shaped as Lambda's poller delivers it."""
    return {
        "messageId": message_id,
        "receiptHandle": receipt_handle,
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": str(receive_count),
            "SentTimestamp": "0",
            "SenderId": "local",
            "ApproximateFirstReceiveTimestamp": "0",
        },
        "messageAttributes": {
            name: {
                "stringValue": value.get("StringValue"),
                "binaryValue": value.get("BinaryValue"),
                "stringListValues": [],
                "binaryListValues": [],
                "dataType": value.get("DataType", "String"),
            }
            for name, value in (message_attributes or {}).items()
        },
        "md5OfBody": "",
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": queue_arn.split(":")[3],
    }


def _record_of(message: dict[str, Any], queue_arn: str) -> dict[str, Any]:
    """The record Lambda's poller builds from a message it received."""
    return sqs_record(
        message["Body"],
        message["MessageId"],
        receipt_handle=message["ReceiptHandle"],
        receive_count=message.get("Attributes", {}).get("ApproximateReceiveCount", "1"),
        message_attributes=message.get("MessageAttributes"),
        queue_arn=queue_arn,
    )


@dataclass
class DrainReport:
    batches: int = 0
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    # Of ``failed``: records the handler gave a visibility of its own (a delay
    # while the LLM quota has no room), left in flight until it runs out.
    delayed: int = 0


class _VisibilitySet:
    """The receipt handles whose visibility the handler changed itself during one
    invocation (``ChangeMessageVisibility`` answered 200 on any of ``clients``)."""

    _OPERATION = "sqs.ChangeMessageVisibility"

    def __init__(self, clients: list[Any]) -> None:
        self._clients = [c for c in clients if hasattr(getattr(c, "meta", None), "events")]
        self.handles: set[str] = set()

    def _before(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["drain_receipt_handle"] = params.get("ReceiptHandle")

    def _after(self, http_response: Any, context: dict[str, Any], **_: Any) -> None:
        handle = context.get("drain_receipt_handle")
        if handle and getattr(http_response, "status_code", 500) < 300:
            self.handles.add(handle)

    def _hooks(self) -> list[tuple[str, Callable[..., None]]]:
        return [
            (f"before-parameter-build.{self._OPERATION}", self._before),
            (f"after-call.{self._OPERATION}", self._after),
        ]

    def __enter__(self) -> _VisibilitySet:
        for client in self._clients:
            for name, hook in self._hooks():
                client.meta.events.register(name, hook)
        return self

    def __exit__(self, *exc: object) -> None:
        for client in self._clients:
            for name, hook in self._hooks():
                client.meta.events.unregister(name, hook)


def _handler_sqs(sqs: Any, deps: Any) -> list[Any]:
    """The SQS clients the generate handler may set a visibility through: its
    dependencies' (the process's own client when none are given) and drain's."""
    if deps is not None:
        handler_sqs = getattr(deps, "sqs", None)
    else:
        from content_retry.aws import client

        handler_sqs = client("sqs")
    return list({id(c): c for c in (sqs, handler_sqs) if c is not None}.values())


def drain(
    sqs: Any,
    queue_url: str,
    *,
    batch_size: int | None = None,
    max_batches: int = 10_000,
    on_batch: Callable[[DrainReport, int, int], None] | None = None,
    deps: Any = None,
    real_queue: bool = False,
) -> DrainReport:
    """Lambda's SQS poller, locally: receive, invoke generate, delete what succeeded.

    Records the handler reports failed are left to the queue, so SQS's
    redrive policy moves a record that keeps failing to the DLQ after
    maxReceiveCount receives. On a local queue they are made visible again at
    once, so a drain sees them through, unless the handler set a visibility
    of its own (a record waiting for the LLM quota returns after a short
    delay): that one is left in flight until its delay runs out, as in AWS,
    instead of being received again at once by a worker that would only wait
    again. On a real queue (``real_queue``) every failed record waits out its
    visibility, as with Lambda: retried at once, a throttled LLM would use up
    every receive in seconds. Stops when the queue shows no visible message (a
    real queue is long-polled, which short polling can miss); records still
    in flight then are the caller's to wait for (``queue_depth`` counts them).

    Args:
        batch_size: records per invocation; default the template's BatchSize.
        on_batch: called after each batch with the report so far, the batch's
            size and its failures (progress display).
        deps: the generate handler's dependencies, when not the process's own.
        real_queue: the queue is not one this machine runs.
    """
    if batch_size is None:
        event = resource("GenerateFunction")["Properties"]["Events"]["RetryMessages"]
        batch_size = int(event["Properties"]["BatchSize"])
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    clients = _handler_sqs(sqs, deps)
    report = DrainReport()
    while report.batches < max_batches:
        messages = sqs.receive_message(
            QueueUrl=queue_url,
            MaxNumberOfMessages=batch_size,
            WaitTimeSeconds=REAL_QUEUE_WAIT_SECONDS if real_queue else 0,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            break
        records = [_record_of(message, queue_arn) for message in messages]
        with _VisibilitySet(clients) as visibility_set:
            response = invoke("generate", {"Records": records}, deps)
        failed_ids = {item["itemIdentifier"] for item in response.get("batchItemFailures", [])}
        done = [m for m in messages if m["MessageId"] not in failed_ids]
        if done:
            sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(done)
                ],
            )
        for message in messages:
            if message["MessageId"] not in failed_ids:
                continue
            if message["ReceiptHandle"] in visibility_set.handles:
                report.delayed += 1  # the handler's own delay stands
            elif not real_queue:
                sqs.change_message_visibility(
                    QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                )
        report.batches += 1
        report.received += len(messages)
        report.succeeded += len(done)
        report.failed += len(failed_ids)
        if on_batch:
            on_batch(report, len(messages), len(failed_ids))
    return report


# Long polling on a real queue: an empty answer then means an empty queue.
REAL_QUEUE_WAIT_SECONDS = 2


def queue_depth(sqs: Any, queue_url: str) -> int:
    """Messages on a queue, visible or in flight."""
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(
        attributes["ApproximateNumberOfMessagesNotVisible"]
    )


@dataclass
class RedriveReport:
    method: str
    moved: int
    dry_run: bool


def redrive(
    sqs: Any, dlq_url: str, queue_url: str, *, dry_run: bool = False, use_move_task: bool = True
) -> RedriveReport:
    """Move the dead-letter queue's messages back to the retry queue.

    Uses SQS's ``StartMessageMoveTask`` when ``use_move_task`` and the endpoint
    has it (AWS does; moto does not), otherwise receives, sends and deletes,
    keeping each message's body (with its generated content) and attributes.
    A dry run only counts, changing nothing (not even receive counts).
    """
    waiting = queue_depth(sqs, dlq_url)
    if dry_run or waiting == 0:
        return RedriveReport(method="none", moved=waiting if dry_run else 0, dry_run=dry_run)
    from botocore.exceptions import ClientError

    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    if use_move_task:
        try:
            sqs.start_message_move_task(SourceArn=dlq_arn, DestinationArn=queue_arn)
        except ClientError:
            pass  # the endpoint has no move task: move the messages one at a time
        else:
            return RedriveReport(method="StartMessageMoveTask", moved=waiting, dry_run=False)

    moved = 0
    while True:
        messages = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=10,
            # use_move_task is asked for against AWS, which short polling can miss
            WaitTimeSeconds=REAL_QUEUE_WAIT_SECONDS if use_move_task else 0,
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            break
        for message in messages:
            # Sent before it is deleted: a crash in between duplicates a message,
            # which the worker's ledger deduplicates; it never loses one.
            sqs.send_message(
                QueueUrl=queue_url,
                MessageBody=message["Body"],
                MessageAttributes=message.get("MessageAttributes", {}),
            )
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message["ReceiptHandle"])
            moved += 1
    return RedriveReport(method="receive/send/delete", moved=moved, dry_run=False)
