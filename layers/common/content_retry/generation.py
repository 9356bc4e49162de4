"""Generating one message's items, and sorting what went wrong (DESIGN §6).

Needs no database and no queue. Given the items to generate, how many times
each was attempted, the generator and the time left, it says what became of
each item: generated, failed for good (with its reason), or to be tried again
later with the whole record:

- an LLM error that may pass (throttling, timeout, a 5xx): try later (SQS
  redelivers the record; its dead-letter queue takes it after maxReceiveCount);
- an answer that is not valid content: try later, until the item has been
  attempted :data:`MALFORMED_OUTPUT_ATTEMPTS` times, then failed for good;
- an LLM error that will not pass (validation, content filtered): failed for good;
- too little time left in the invocation for another call: try later, uncalled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.generated import ContentModel
from content_retry.generators import (
    ContentGenerator,
    MalformedOutputError,
    PermanentGenerationError,
    TransientGenerationError,
)
from content_retry.messages import Preferences

# Deliveries of one item whose answers were malformed before the item fails
# for good: a model that keeps answering badly is not paid forever.
MALFORMED_OUTPUT_ATTEMPTS = 3


class NotEnoughTimeError(TransientGenerationError):
    """Too little time left in the invocation for another LLM call: try again later."""


@dataclass(frozen=True)
class Generated:
    content: ContentModel


@dataclass(frozen=True)
class FailedForGood:
    reason: str


@dataclass(frozen=True)
class TryLater:
    error: TransientGenerationError


ItemOutcome = Generated | FailedForGood | TryLater


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
        return Generated(generator.generate(concept, content_type, preferences))
    except MalformedOutputError as exc:
        if attempts >= MALFORMED_OUTPUT_ATTEMPTS:
            return FailedForGood(f"malformed output {attempts} times: {exc}")
        return TryLater(exc)
    except TransientGenerationError as exc:
        return TryLater(exc)
    except PermanentGenerationError as exc:
        return FailedForGood(str(exc))


@dataclass
class MessageGeneration:
    """What generating one message's items came to."""

    generated: dict[ContentType, ContentModel] = field(default_factory=dict)
    failed_for_good: dict[ContentType, str] = field(default_factory=dict)
    # Set when the record must come back: the items after it were not tried.
    try_later: TransientGenerationError | None = None


@dataclass(frozen=True)
class ItemToGenerate:
    content_type: ContentType
    attempts: int


def generate_items(
    generator: ContentGenerator,
    concept: Concept,
    preferences: Preferences,
    items: Sequence[ItemToGenerate],
    *,
    seconds_left: Callable[[], float],
    call_budget_seconds: float,
) -> MessageGeneration:
    """Generate a message's items one after another, in their order.

    Stops at the first item to try later (the record comes back whole, and
    what was generated before it is still saved), and starts no call with
    less than ``call_budget_seconds`` left.
    """
    result = MessageGeneration()
    for item in items:
        left = seconds_left()
        if left < call_budget_seconds:
            result.try_later = NotEnoughTimeError(
                f"{left:.0f}s left in the invocation; an LLM call may take "
                f"{call_budget_seconds:.0f}s"
            )
            break
        outcome = generate_item(
            generator, concept, item.content_type, preferences, attempts=item.attempts
        )
        if isinstance(outcome, Generated):
            result.generated[item.content_type] = outcome.content
        elif isinstance(outcome, FailedForGood):
            result.failed_for_good[item.content_type] = outcome.reason
        else:
            result.try_later = outcome.error
            break
    return result
