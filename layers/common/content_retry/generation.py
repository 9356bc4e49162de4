"""Generating a batch's items: concurrent, paced by the shared quota, each item
ending generated, failed permanently, or to try later (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Protocol

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.costs import NOT_CALLED, ItemCost
from content_retry.deadlines import Deadline
from content_retry.generated import ContentModel
from content_retry.generators import (
    NO_USAGE,
    ConfigurationError,
    ContentGenerator,
    GenerationError,
    MalformedOutputError,
    PermanentGenerationError,
    ThrottledError,
    TransientGenerationError,
    Usage,
)
from content_retry.messages import Preferences
from content_retry.observability import continue_trace, logger, trace_entity, traced
from content_retry.pacing import Grant

# The LLM call (counting the item's earlier calls) on which a malformed answer
# fails the item permanently: a model that keeps answering badly is not paid
# forever. Calls are counted, not deliveries: a delivery paced or throttled
# before its call costs nothing and counts nothing.
MALFORMED_OUTPUT_CALLS = 3
# A call Bedrock throttled waits once in its invocation for the shared pace;
# throttled again (or with no time to wait), its record comes back after about
# this long, not after the queue's whole visibility timeout.
THROTTLED_DELAY_SECONDS = 5


class NotCalledError(TransientGenerationError):
    """The item was not sent to the LLM (no time, no quota, no database): nothing paid."""


class NotEnoughTimeError(NotCalledError):
    """Too little time left in the invocation for another LLM call."""


class PacedError(NotCalledError):
    """The account's quota has no room for the call before the deadline."""


@dataclass(frozen=True)
class Generated:
    content: ContentModel
    cost: ItemCost


@dataclass(frozen=True)
class FailedPermanently:
    reason: str
    cost: ItemCost


@dataclass(frozen=True)
class TryLater:
    error: GenerationError
    cost: ItemCost = NOT_CALLED
    # Seconds until the record should come back; None: the queue's own timeout.
    delay_seconds: float | None = None


ItemOutcome = Generated | FailedPermanently | TryLater


def _paid(usage: Usage) -> ItemCost:
    return ItemCost.of_call(usage)


def _malformed(error: Exception, calls: int, usage: Usage) -> ItemOutcome:
    """An invalid answer (or an error the generator does not name): tried again
    until the item's LLM calls reach the bound, then failed with its reason."""
    cost = _paid(usage)
    if calls >= MALFORMED_OUTPUT_CALLS:
        return FailedPermanently(f"{error} (on {calls} LLM calls)", cost)
    return TryLater(MalformedOutputError(str(error), usage=usage), cost)


def generate_item(
    generator: ContentGenerator,
    concept: Concept,
    content_type: ContentType,
    preferences: Preferences,
    *,
    calls: int,
) -> ItemOutcome:
    """Call the generator for one item and sort its outcome.

    Args:
        calls: the item's LLM calls, this one included.
    """
    try:
        generation = generator.generate(concept, content_type, preferences)
    except MalformedOutputError as exc:
        return _malformed(MalformedOutputError(f"malformed output: {exc}"), calls, exc.usage)
    except ThrottledError as exc:
        # Refused before the model ran: nothing paid, no call counted.
        throttled = ItemCost(throttled_attempts=max(exc.usage.throttled_attempts, 1))
        return TryLater(exc, throttled, THROTTLED_DELAY_SECONDS)
    except ConfigurationError as exc:
        return TryLater(exc, ItemCost(throttled_attempts=exc.usage.throttled_attempts))
    except TransientGenerationError as exc:
        return TryLater(exc, _paid(exc.usage))
    except PermanentGenerationError as exc:
        return FailedPermanently(str(exc), _paid(exc.usage))
    except Exception as exc:  # a generator bug or a library's error: never an item left running
        error = RuntimeError(f"generator failed: {type(exc).__name__}: {exc}")
        return _malformed(error, calls, NO_USAGE)
    return Generated(generation.content, _paid(generation.usage))


@dataclass(frozen=True)
class ItemToGenerate:
    content_type: ContentType
    # LLM calls the ledger recorded for the item before this delivery.
    calls_before: int = 0


@dataclass(frozen=True)
class MessageRequest:
    """One message's items to generate."""

    message_id: str
    task_id: str
    roadmap_id: str
    concept: Concept
    preferences: Preferences
    items: Sequence[ItemToGenerate]


@dataclass
class MessageGeneration:
    """What generating one message's items came to."""

    generated: dict[ContentType, ContentModel] = field(default_factory=dict)
    failed_permanently: dict[ContentType, str] = field(default_factory=dict)
    # Set when the record must come back (the first such item's error).
    try_later: GenerationError | None = None
    delay_seconds: float | None = None
    costs: dict[ContentType, ItemCost] = field(default_factory=dict)

    def add(self, content_type: ContentType, outcome: ItemOutcome) -> None:
        self.costs[content_type] = outcome.cost
        if isinstance(outcome, Generated):
            self.generated[content_type] = outcome.content
        elif isinstance(outcome, FailedPermanently):
            self.failed_permanently[content_type] = outcome.reason
        elif self.try_later is None or isinstance(self.try_later, NotCalledError):
            # The most telling error: a call's own over "not called".
            self.try_later, self.delay_seconds = outcome.error, outcome.delay_seconds


class CallPacer(Protocol):
    """The account's LLM quota, shared with every other container."""

    def grant(self, calls: int, tokens_per_call: int, *, throttled: bool) -> Grant:
        """Take up to ``calls`` calls; ``throttled``: the LLM throttled one since
        the last grant. Raises what its store raises."""
        ...


class Reserving(Protocol):
    """A generator that says what a call reserves against the quota."""

    def reservation(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> int: ...


class _MessageInFlight:
    def __init__(self, request: MessageRequest) -> None:
        self.request = request
        self.outcomes: dict[ContentType, ItemOutcome] = {}
        # Written by the pool's threads: the first item to be tried later.
        self.try_later: GenerationError | None = None
        self.lock = threading.Lock()

    @property
    def done(self) -> bool:
        return len(self.outcomes) == len(self.request.items)

    def result(self) -> MessageGeneration:
        result = MessageGeneration()
        for item in self.request.items:  # in the message's order
            result.add(item.content_type, self.outcomes[item.content_type])
        return result


_Call = tuple[_MessageInFlight, ItemToGenerate]


class BatchGeneration:
    """Runs a batch's LLM calls at once, at most ``parallelism`` at a time, as
    the quota allows and while the deadline leaves ``call_budget_seconds``.

    Args:
        pacer: the shared quota (None: calls are not paced).
        stop_reason: why no more calls should start (the database failed), or None.
    """

    def __init__(
        self,
        generator: ContentGenerator,
        *,
        parallelism: int,
        deadline: Deadline,
        call_budget_seconds: float,
        pacer: CallPacer | None = None,
        stop_reason: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._generator = generator
        self._parallelism = parallelism
        self._deadline = deadline
        self._budget = call_budget_seconds
        self._pacer = pacer
        self._external_stop = stop_reason
        self._trace: object = None
        # Set by any thread: why no call starts any more (a configuration fault).
        self._stopped: GenerationError | None = None
        self._throttled = False
        self._next_grant_at = 0.0
        self.paced_calls = 0
        # Calls throttled and put back to wait for the pace, with their attempts.
        self._requeued: set[tuple[str, ContentType]] = set()
        self._throttled_attempts: dict[tuple[str, ContentType], int] = {}

    def run(self, requests: Sequence[MessageRequest]) -> Iterator[tuple[str, MessageGeneration]]:
        """Each message's id and result, as soon as all its items are done."""
        in_flight = [_MessageInFlight(request) for request in requests]
        for message in in_flight:
            if message.done:
                yield message.request.message_id, MessageGeneration()
        pending: deque[_Call] = deque((m, item) for m in in_flight for item in m.request.items)
        if not pending:
            return
        # The pool's threads carry on this thread's trace: each call is a subsegment.
        self._trace = trace_entity()
        futures: dict[Future[ItemOutcome], _Call] = {}
        with ThreadPoolExecutor(max_workers=self._parallelism, thread_name_prefix="llm") as pool:
            while pending or futures:
                settled = self._start_what_may_start(pending, futures, pool)
                timeout = max(self._next_grant_at - time.monotonic(), 0) if pending else None
                done, _ = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
                if not futures and pending:
                    time.sleep(timeout or 0)
                for future in done:
                    message, item = futures.pop(future)
                    outcome = self._throttled_again(message, item, future.result(), pending)
                    if outcome is not None:
                        settled.append((message, item, outcome))
                for message, item, outcome in settled:
                    message.outcomes[item.content_type] = outcome
                    if message.done:
                        yield message.request.message_id, message.result()
        self._report_throttle()

    def _throttled_again(
        self,
        message: _MessageInFlight,
        item: ItemToGenerate,
        outcome: ItemOutcome,
        pending: deque[_Call],
    ) -> ItemOutcome | None:
        """A call the LLM throttled waits in this invocation for the shared pace,
        once (None: it is pending again); its throttled attempts are kept."""
        key = (message.request.message_id, item.content_type)
        throttled = self._throttled_attempts.pop(key, 0)
        if outcome.cost.throttled_attempts:
            self._throttled = True  # the shared pace learns of it at its next take
        throttled_now = isinstance(outcome, TryLater) and isinstance(outcome.error, ThrottledError)
        if throttled_now and key not in self._requeued and self._pacer is not None:
            self._requeued.add(key)
            self._throttled_attempts[key] = throttled + outcome.cost.throttled_attempts
            pending.append((message, item))
            return None
        if not throttled:
            return outcome
        more = ItemCost(throttled_attempts=throttled)
        return replace(outcome, cost=outcome.cost + more)

    def _report_throttle(self) -> None:
        """A throttle no later take of this invocation carried reaches the shared
        pace all the same (a take of no call)."""
        if self._throttled and self._pacer is not None:
            self._throttled = False
            try:
                self._pacer.grant(0, 1, throttled=True)
            except Exception:  # the pace learns it from the next throttle instead
                logger.warning("llm_throttle_not_reported")

    def _start_what_may_start(
        self,
        pending: deque[_Call],
        futures: dict[Future[ItemOutcome], _Call],
        pool: ThreadPoolExecutor,
    ) -> list[tuple[_MessageInFlight, ItemToGenerate, ItemOutcome]]:
        """Submit the calls the quota allows now; returns the pending items that
        will not be called in this invocation, with why."""
        if not pending or time.monotonic() < self._next_grant_at:
            return []
        reason = self._stop_reason()
        if reason is not None:
            return self._give_up(pending, TryLater(reason))
        grant = self._grant(pending)
        if isinstance(grant, TryLater):
            return self._give_up(pending, grant)
        for _ in range(min(grant.calls, len(pending))):
            message, item = pending.popleft()
            futures[pool.submit(self._call, message, item)] = (message, item)
        if not pending:
            return []
        self.paced_calls += len(pending)
        wait_seconds = max(grant.retry_after_seconds, 0.05)
        if self._deadline.left() - wait_seconds < self._budget:
            paced = PacedError(f"the LLM quota has room in {wait_seconds:.1f}s; too late to wait")
            return self._give_up(pending, TryLater(paced, delay_seconds=wait_seconds))
        self._next_grant_at = time.monotonic() + wait_seconds
        return []

    def _grant(self, pending: deque[_Call]) -> Grant | TryLater:
        if self._pacer is None or not hasattr(self._generator, "reservation"):
            return Grant(len(pending), 0.0)
        reserving: Reserving = self._generator  # type: ignore[assignment]
        per_call = max(
            reserving.reservation(m.request.concept, item.content_type, m.request.preferences)
            for m, item in pending
        )
        throttled, self._throttled = self._throttled, False
        try:
            return self._pacer.grant(len(pending), per_call, throttled=throttled)
        except Exception as exc:  # the quota's store failed: no call without the pace
            return TryLater(NotCalledError(f"the LLM quota could not be read: {exc!r}"[:500]))

    def _stop_reason(self) -> GenerationError | None:
        if self._stopped is not None:
            return self._stopped
        external = self._external_stop()
        return NotCalledError(external) if external is not None else None

    @staticmethod
    def _give_up(
        pending: deque[_Call], outcome: TryLater
    ) -> list[tuple[_MessageInFlight, ItemToGenerate, ItemOutcome]]:
        given_up: list[tuple[_MessageInFlight, ItemToGenerate, ItemOutcome]] = [
            (message, item, outcome) for message, item in pending
        ]
        pending.clear()
        return given_up

    def _call(self, message: _MessageInFlight, item: ItemToGenerate) -> ItemOutcome:
        with message.lock:
            if message.try_later is not None:
                return TryLater(message.try_later)
        stopped = self._stop_reason()
        left = self._deadline.left()
        if stopped is not None:
            outcome: ItemOutcome = TryLater(stopped)
        elif left < self._budget:
            outcome = TryLater(
                NotEnoughTimeError(
                    f"{left:.0f}s left in the invocation; an LLM call may take {self._budget:.0f}s"
                )
            )
        else:
            outcome = self._traced_call(message.request, item)
        if isinstance(outcome, TryLater):
            self._note_try_later(outcome.error)
            if not isinstance(outcome.error, ThrottledError):  # that one may wait for the pace here
                with message.lock:
                    message.try_later = message.try_later or outcome.error
        return outcome

    def _traced_call(self, request: MessageRequest, item: ItemToGenerate) -> ItemOutcome:
        continue_trace(self._trace)
        with traced(
            "llm_call",
            task_id=request.task_id,
            roadmap_id=request.roadmap_id,
            content_type=item.content_type.value,
        ):
            return generate_item(
                self._generator,
                request.concept,
                item.content_type,
                request.preferences,
                calls=item.calls_before + 1,
            )

    def _note_try_later(self, error: GenerationError) -> None:
        if isinstance(error, ConfigurationError):
            # Every other call would be refused the same way.
            self._stopped = self._stopped or error
