"""Generating a batch's items, concurrently, and sorting what went wrong (DESIGN §6).

Needs no database and no queue. Every item of a batch is one LLM call, and
the calls run at once through a bounded pool of threads (the generate
function spends its time waiting on the model); each message's result comes
back as soon as all its items are done, so it can be saved while the others
are still generating. What became of each item:

- generated, with what the call cost;
- failed for good, with its reason: an LLM error that will not pass
  (validation, content filtered), or an answer that was not valid content
  (or a generator failing in a way it does not name) on the item's
  :data:`MALFORMED_OUTPUT_ATTEMPTS`-th attempt;
- to be tried again later with the whole record: an LLM error that may pass
  (throttling, timeout, a 5xx), an invalid answer before its bound, or too
  little time left in the invocation for another call (not called). Once an
  item of a message is to be tried later, that message's items not yet
  started are not started: the record comes back anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.costs import NOT_CALLED, ItemCost
from content_retry.generated import ContentModel
from content_retry.generators import (
    NO_USAGE,
    ContentGenerator,
    MalformedOutputError,
    PermanentGenerationError,
    TransientGenerationError,
    Usage,
)
from content_retry.messages import Preferences
from content_retry.observability import continue_trace, trace_entity, traced

# The item's attempt (its deliveries so far, whatever ended the earlier ones)
# from which a malformed answer fails it for good: a model that keeps answering
# badly is not paid forever. Attempts are what the ledger counts, so a throttled
# delivery counts too; the bound is on the item's cost, not on bad answers alone.
MALFORMED_OUTPUT_ATTEMPTS = 3


class NotEnoughTimeError(TransientGenerationError):
    """Too little time left in the invocation for another LLM call: try again later."""


@dataclass(frozen=True)
class Generated:
    content: ContentModel
    cost: ItemCost


@dataclass(frozen=True)
class FailedForGood:
    reason: str
    cost: ItemCost


@dataclass(frozen=True)
class TryLater:
    error: TransientGenerationError
    cost: ItemCost = NOT_CALLED


ItemOutcome = Generated | FailedForGood | TryLater


def _bounded(error: Exception, attempts: int, usage: Usage) -> ItemOutcome:
    """An invalid answer (or an error the generator does not name): tried again
    until the item's attempts reach the bound, then failed with its reason."""
    cost = ItemCost.of_call(usage)
    if attempts >= MALFORMED_OUTPUT_ATTEMPTS:
        return FailedForGood(f"{error} (on {attempts} attempts)", cost)
    if isinstance(error, TransientGenerationError):
        return TryLater(error, cost)
    return TryLater(MalformedOutputError(str(error), usage=usage), cost)


def generate_item(
    generator: ContentGenerator,
    concept: Concept,
    content_type: ContentType,
    preferences: Preferences,
    *,
    attempts: int,
) -> ItemOutcome:
    """Call the generator for one item and sort its outcome.

    Args:
        attempts: deliveries of this item so far, this one included.
    """
    try:
        generation = generator.generate(concept, content_type, preferences)
    except MalformedOutputError as exc:
        return _bounded(MalformedOutputError(f"malformed output: {exc}"), attempts, exc.usage)
    except TransientGenerationError as exc:
        return TryLater(exc, ItemCost.of_call(exc.usage))
    except PermanentGenerationError as exc:
        return FailedForGood(str(exc), ItemCost.of_call(exc.usage))
    except Exception as exc:  # a generator bug or a library's error: never an item left running
        return _bounded(
            RuntimeError(f"generator failed: {type(exc).__name__}: {exc}"), attempts, NO_USAGE
        )
    return Generated(generation.content, ItemCost.of_call(generation.usage))


@dataclass(frozen=True)
class ItemToGenerate:
    content_type: ContentType
    attempts: int


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
    failed_for_good: dict[ContentType, str] = field(default_factory=dict)
    # Set when the record must come back (the first such item's error).
    try_later: TransientGenerationError | None = None
    costs: dict[ContentType, ItemCost] = field(default_factory=dict)

    def add(self, content_type: ContentType, outcome: ItemOutcome) -> None:
        self.costs[content_type] = outcome.cost
        if isinstance(outcome, Generated):
            self.generated[content_type] = outcome.content
        elif isinstance(outcome, FailedForGood):
            self.failed_for_good[content_type] = outcome.reason
        elif self.try_later is None:
            self.try_later = outcome.error


class _MessageInFlight:
    def __init__(self, request: MessageRequest) -> None:
        self.request = request
        self.outcomes: dict[ContentType, ItemOutcome] = {}
        # Written by the pool's threads: the first item to be tried later.
        self.try_later: TransientGenerationError | None = None
        self.lock = threading.Lock()

    def result(self) -> MessageGeneration:
        result = MessageGeneration()
        for item in self.request.items:  # in the message's order
            result.add(item.content_type, self.outcomes[item.content_type])
        return result


class BatchGeneration:
    """Runs a batch's LLM calls at once, at most ``parallelism`` at a time.

    Args:
        seconds_left: the invocation's time left; no call starts with less
            than ``call_budget_seconds`` of it.
        parallelism: calls at once; 1 makes them in the batch's order, one by one.
    """

    def __init__(
        self,
        generator: ContentGenerator,
        *,
        parallelism: int,
        seconds_left: Callable[[], float],
        call_budget_seconds: float,
    ) -> None:
        self._generator = generator
        self._parallelism = parallelism
        self._seconds_left = seconds_left
        self._budget = call_budget_seconds
        self._trace: object = None

    def run(self, requests: Sequence[MessageRequest]) -> Iterator[tuple[str, MessageGeneration]]:
        """Each message's id and result, as soon as all its items are done."""
        in_flight = [_MessageInFlight(request) for request in requests]
        for message in in_flight:
            if not message.request.items:
                yield message.request.message_id, MessageGeneration()
        calls = [(m, item) for m in in_flight for item in m.request.items]
        if not calls:
            return
        # The pool's threads carry on this thread's trace, so each call is a
        # subsegment of the invocation's.
        self._trace = trace_entity()
        with ThreadPoolExecutor(
            max_workers=min(self._parallelism, len(calls)), thread_name_prefix="llm"
        ) as pool:
            futures: dict[Future[ItemOutcome], tuple[_MessageInFlight, ItemToGenerate]] = {
                pool.submit(self._call, message, item): (message, item) for message, item in calls
            }
            for future in as_completed(futures):
                message, item = futures[future]
                message.outcomes[item.content_type] = future.result()
                if len(message.outcomes) == len(message.request.items):
                    yield message.request.message_id, message.result()

    def _call(self, message: _MessageInFlight, item: ItemToGenerate) -> ItemOutcome:
        with message.lock:
            if message.try_later is not None:
                return TryLater(message.try_later)
        left = self._seconds_left()
        if left < self._budget:
            outcome: ItemOutcome = TryLater(
                NotEnoughTimeError(
                    f"{left:.0f}s left in the invocation; an LLM call may take {self._budget:.0f}s"
                )
            )
        else:
            request = message.request
            continue_trace(self._trace)
            with traced(
                "llm_call",
                task_id=request.task_id,
                roadmap_id=request.roadmap_id,
                content_type=item.content_type.value,
            ):
                outcome = generate_item(
                    self._generator,
                    request.concept,
                    item.content_type,
                    request.preferences,
                    attempts=item.attempts,
                )
        if isinstance(outcome, TryLater):
            with message.lock:
                message.try_later = message.try_later or outcome.error
        return outcome
