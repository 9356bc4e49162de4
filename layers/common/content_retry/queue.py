"""SQS: sending retry messages in batches, and dead-lettering with a reason."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from content_retry import deadlines
from content_retry.observability import continue_trace, trace_entity
from content_retry.validation import clip_error

# SendMessageBatch takes at most 10 entries, of at most 1 MiB in all; a message
# may be 1 MiB too (template.yaml's MaximumMessageSize). SQS counts a message
# as its body's UTF-8 bytes plus each message attribute's name, type and value.
BATCH_SIZE = 10
MAX_BATCH_BYTES = 1_048_576
MAX_MESSAGE_BYTES = 1_048_576
# Entries SQS reports failed are sent again this many more times before the
# concept's claim is released.
RESEND_ATTEMPTS = 2
# SendMessageBatch calls in flight at once: as many as the SQS client's
# connection pool holds (botocore's max_pool_connections, 10 by default), so
# no call opens a connection only to drop it. At 15 ms a call, 10,000 messages
# take 1,000 calls: 1.5 s at once, 15 s one after another.
SEND_CONCURRENCY = 10
# Once the first SEND_CONCURRENCY calls are started, no batch is started with
# less than SEND_MARGIN_SECONDS of the deadline's time left: what the calls in
# flight need to answer (milliseconds), and the caller to record what was sent
# and release what was not. The first calls are always made, as a send always
# was: a retry of up to 100 concepts takes one call's time, which the reserve
# the deadline keeps to answer covers. A call in flight is waited for until
# ANSWER_MARGIN_SECONDS before the answer must leave (the reserve included),
# then given up: SQS that stops answering cannot keep the caller from answering.
SEND_MARGIN_SECONDS = 0.5
ANSWER_MARGIN_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message ready to send: its concept, and its body as SQS counts it (UTF-8)."""

    concept_id: str
    body: bytes
    # SendMessage's MessageAttributes, if any (they count against the limits).
    attributes: Mapping[str, Mapping[str, Any]] | None = None

    @property
    def size(self) -> int:
        """Bytes SQS counts against its limits: the body, and each attribute's
        name, data type and value."""
        size = len(self.body)
        for name, attribute in (self.attributes or {}).items():
            value = attribute.get("StringValue") or attribute.get("BinaryValue") or b""
            size += len(name.encode()) + len(str(attribute.get("DataType", "")).encode())
            size += len(value.encode() if isinstance(value, str) else value)
        return size

    def entry(self, entry_id: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"Id": entry_id, "MessageBody": self.body.decode()}
        if self.attributes:
            entry["MessageAttributes"] = self.attributes
        return entry


@dataclass
class SendResult:
    sent: list[str] = field(default_factory=list)  # concept ids
    failed: dict[str, str] = field(default_factory=dict)  # concept id -> last error
    # Concepts whose batch had not answered when the time ran out, or whose
    # call ended in a crash: they may be in the queue or not.
    unconfirmed: list[str] = field(default_factory=list)
    # Why the messages in none of the above were never started (the time ran
    # out, or a call crashed); None when every message was.
    not_started: str | None = None
    api_calls: int = 0


def send_retry_messages(
    sqs: Any,
    queue_url: str,
    messages: Iterable[OutgoingMessage],
    *,
    sleep: Callable[[float], None] = time.sleep,
    on_sent: Callable[[list[str]], None] = lambda concept_ids: None,
    deadline: deadlines.Deadline = deadlines.UNBOUNDED,
    concurrency: int | None = None,
) -> SendResult:
    """Send one message per concept in ``SendMessageBatch`` calls, ``concurrency``
    (by default SEND_CONCURRENCY) at once.

    A batch holds at most BATCH_SIZE messages of at most MAX_BATCH_BYTES in
    all; a message over MAX_MESSAGE_BYTES is failed on its own, with why.
    ``messages`` is read as batches are needed, so a large plan's bodies are
    never all in memory. Entries SQS reports failed are sent again (up to
    RESEND_ATTEMPTS more times, with a short backoff); a call that raises a
    botocore error counts as every entry of that batch failing.

    ``on_sent`` is called on this thread with each batch's sent concepts as
    soon as it answers (the caller records them, batch by batch). Once
    ``deadline`` leaves less than SEND_MARGIN_SECONDS, no batch is started
    beyond the first ``concurrency`` (the result's ``not_started`` says why;
    batches waiting for a thread or to be sent again are failed with it), and
    calls that have not answered ANSWER_MARGIN_SECONDS before the deadline's
    reserve runs out are given up as unconfirmed. Nothing raises for SQS: what
    could not be sent is returned, so the caller can release those claims.

    Raises:
        Whatever else a call raised, or ``messages`` (a crash), once the other
        calls in flight have answered (within the time) and ``on_sent`` has
        been told of each sent batch; the crashed batch's concepts are
        unconfirmed.
    """
    sender = _Sender(sqs, queue_url, sleep, on_sent, deadline, concurrency or SEND_CONCURRENCY)
    return sender.run(messages)


@dataclass(frozen=True, slots=True)
class _Batch:
    messages: list[OutgoingMessage]
    attempt: int = 0

    def concept_ids(self) -> list[str]:
        return [message.concept_id for message in self.messages]


def _batches(messages: Iterable[OutgoingMessage], result: SendResult) -> Iterator[_Batch]:
    """Group messages into batches by count and by bytes, in order; a message
    over the limit on its own is failed here, never sent."""
    batch: list[OutgoingMessage] = []
    size = 0
    for message in messages:
        message_size = message.size
        if message_size > MAX_MESSAGE_BYTES:
            result.failed[message.concept_id] = (
                f"the message is {message_size:,} bytes, over SQS's limit of "
                f"{MAX_MESSAGE_BYTES:,} bytes for one message: not sent"
            )
            continue
        if batch and (len(batch) == BATCH_SIZE or size + message_size > MAX_BATCH_BYTES):
            yield _Batch(batch)
            batch, size = [], 0
        batch.append(message)
        size += message_size
    if batch:
        yield _Batch(batch)


class _Sender:
    """The calling thread's side of a send: batches in, answers out, in order of answer."""

    def __init__(
        self,
        sqs: Any,
        queue_url: str,
        sleep: Callable[[float], None],
        on_sent: Callable[[list[str]], None],
        deadline: deadlines.Deadline,
        concurrency: int,
    ) -> None:
        self._sqs, self._queue_url, self._sleep = sqs, queue_url, sleep
        self._on_sent, self._deadline, self._concurrency = on_sent, deadline, concurrency
        # Batches submitted ahead of the threads, so that they keep sending
        # while on_sent records a group (tens of milliseconds): 8 calls each,
        # 120 ms at 15 ms a call (B10: 4 each made 50,000 concepts 1.2x slower).
        self._window = 8 * concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sqs-send")
        self._in_flight: dict[Future[dict[int, str]], _Batch] = {}
        self._resends: list[_Batch] = []
        self._crash: BaseException | None = None
        # The pool's threads carry on this thread's trace: each call is a subsegment.
        self._trace = trace_entity()
        self.result = SendResult()

    def run(self, messages: Iterable[OutgoingMessage]) -> SendResult:
        batches = _batches(messages, self.result)
        try:
            self._submit(batches)
            while self._in_flight:
                done = self._answered()
                if not done:  # out of time: what is still in flight is given up
                    for batch in self._in_flight.values():
                        self.result.unconfirmed += batch.concept_ids()
                    break
                for future in done:
                    self._settle(future, self._in_flight.pop(future))
                self._submit(batches)
        finally:
            # Never waits: a call given up may still answer, after the caller.
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._crash is not None:
            raise self._crash
        return self.result

    def _submit(self, batches: Iterator[_Batch]) -> None:
        """Start batches (resends first) until the window is full or the
        messages are all sent; once the time is up, start none."""
        while self.result.not_started is None and len(self._in_flight) < self._window:
            if self._out_of_time():
                self._stop(
                    "not sent: the invocation's time ran out "
                    f"(less than {SEND_MARGIN_SECONDS} s was left to send it)"
                )
                return
            try:
                batch = self._resends.pop() if self._resends else next(batches, None)
            except Exception as exc:  # a message that cannot be built: a crash too
                self._crash = exc
                self._stop(f"not sent: a message could not be built ({exc!r})")
                return
            if batch is None:
                return
            self.result.api_calls += 1
            future = self._pool.submit(
                _send_batch, self._sqs, self._queue_url, batch, self._sleep, self._trace
            )
            self._in_flight[future] = batch

    def _out_of_time(self) -> bool:
        started = self.result.api_calls >= self._concurrency
        return started and self._deadline.left() < SEND_MARGIN_SECONDS

    def _stop(self, reason: str) -> None:
        """Start no batch any more: those waiting for a thread, or to be sent
        again, fail with ``reason``; the rest were never started."""
        self.result.not_started = reason
        waiting = [future for future in self._in_flight if future.cancel()]
        for batch in [*self._resends, *(self._in_flight.pop(future) for future in waiting)]:
            self.result.failed.update(dict.fromkeys(batch.concept_ids(), reason))
        self._resends.clear()

    def _answered(self) -> set[Future[dict[int, str]]]:
        """The calls in flight that have answered, waiting for at least one
        while the time allows (none: the time is up)."""
        left = self._deadline.left() + self._deadline.reserve_seconds - ANSWER_MARGIN_SECONDS
        timeout = None if left == float("inf") else max(left, 0)
        done, _ = wait(self._in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
        return done

    def _settle(self, future: Future[dict[int, str]], batch: _Batch) -> None:
        crash = future.exception()
        if crash is not None:
            self._crash = self._crash or crash
            self.result.unconfirmed += batch.concept_ids()
            if self.result.not_started is None:
                self._stop(f"not sent: a send crashed ({crash!r})")
            return
        errors = future.result()
        sent = [m.concept_id for n, m in enumerate(batch.messages) if n not in errors]
        if sent:
            self.result.sent += sent
            self._on_sent(sent)
        if not errors:
            return
        failed = [batch.messages[n] for n in sorted(errors)]
        if batch.attempt < RESEND_ATTEMPTS:
            self._resends.append(_Batch(failed, batch.attempt + 1))
            return
        for n in errors:
            self.result.failed[batch.messages[n].concept_id] = errors[n]


def _send_batch(
    sqs: Any, queue_url: str, batch: _Batch, sleep: Callable[[float], None], trace: Any
) -> dict[int, str]:
    """Send one batch (after its backoff, for a resend); returns the failed
    entries' positions with their errors. Runs on a pool thread."""
    from botocore.exceptions import BotoCoreError, ClientError

    continue_trace(trace)
    if batch.attempt:
        sleep(0.1 * 2**batch.attempt)
    try:
        response = sqs.send_message_batch(
            QueueUrl=queue_url,
            Entries=[message.entry(str(n)) for n, message in enumerate(batch.messages)],
        )
    except (BotoCoreError, ClientError) as exc:
        return dict.fromkeys(range(len(batch.messages)), f"{type(exc).__name__}: {exc}")
    return {
        int(failure["Id"]): (
            f"{failure.get('Code', 'Error')}: {failure.get('Message', '')}".strip()
        )
        for failure in response.get("Failed", [])
    }


class DeadLetterError(RuntimeError):
    """The dead-letter queue could not be reached: the caller must not acknowledge.

    Keeps what it could not send (the body, with any generated content, and
    its reason), so a later attempt sends that and not a poorer copy.
    """

    def __init__(
        self, problem: str, *, body: str, reason: str, detail: str, paid: str | None = None
    ) -> None:
        super().__init__(problem)
        self.body = body
        self.reason = reason
        self.detail = detail
        self.paid = paid


# The message attribute of a dead-letter copy that says what its generated
# content cost (JSON: content type -> [calls, input tokens, output tokens]):
# the save of a re-drive adds it to the ledger, whose note could not be written
# when the database failed. Attributes travel with the message on a re-drive.
PAID_ATTRIBUTE = "paid"


def dead_letter(
    sqs: Any, dlq_url: str, body: str, *, reason: str, detail: str, paid: str | None = None
) -> None:
    """Send a body to the dead-letter queue with its reason in message attributes.

    Args:
        reason: a short code an operator can filter on (``save_failed``,
            ``invalid_message``, ``not_planned``...).
        detail: what went wrong, clipped to the attribute's useful length.

    Raises:
        DeadLetterError: the dead-letter queue refused the message or was unreachable.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    attributes = {
        "reason": {"DataType": "String", "StringValue": reason},
        "error": {"DataType": "String", "StringValue": clip_error(detail) or "-"},
    }
    if paid:
        attributes[PAID_ATTRIBUTE] = {"DataType": "String", "StringValue": paid}
    try:
        sqs.send_message(QueueUrl=dlq_url, MessageBody=body, MessageAttributes=attributes)
    except (BotoCoreError, ClientError) as exc:
        raise DeadLetterError(
            f"dead-letter queue unavailable: {exc}",
            body=body,
            reason=reason,
            detail=detail,
            paid=paid,
        ) from exc
