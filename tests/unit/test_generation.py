"""The generate function's failure table (DESIGN §6), for the LLM's part: no
database, no queue, no network. What each kind of generator outcome becomes,
and how a batch's calls run."""

from __future__ import annotations

import pytest

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.costs import NOT_CALLED, ItemCost
from content_retry.generated import TutorialContent
from content_retry.generation import (
    MALFORMED_OUTPUT_ATTEMPTS,
    BatchGeneration,
    FailedForGood,
    Generated,
    ItemOutcome,
    ItemToGenerate,
    MessageRequest,
    NotEnoughTimeError,
    TryLater,
    generate_item,
)
from content_retry.generators import (
    MalformedOutputError,
    PermanentGenerationError,
    TransientGenerationError,
    Usage,
)
from content_retry.messages import Preferences
from tests.support import CountingGenerator

T, R, Q = ContentType.TUTORIAL, ContentType.RESOURCES, ContentType.QUIZ
USAGE = Usage(input_tokens=120, output_tokens=800, throttled_attempts=1)
CONCEPT = Concept(concept_id="c1", name="Closures")


def _one(failure: Exception | None, attempts: int = 1) -> ItemOutcome:
    generator = CountingGenerator(usage=USAGE)
    if failure is not None:
        generator.failures[("c1", T.value)] = failure
    return generate_item(generator, CONCEPT, T, Preferences(), attempts=attempts)


def test_content_generated_is_kept_with_what_the_call_cost() -> None:
    outcome = _one(None)

    assert isinstance(outcome, Generated)
    assert isinstance(outcome.content, TutorialContent)
    assert outcome.cost == ItemCost(1, 120, 800, 1)


def test_an_llm_error_that_may_pass_is_tried_later_and_its_cost_kept() -> None:
    error = TransientGenerationError("ThrottlingException: slow down", usage=USAGE)

    outcome = _one(error)

    assert isinstance(outcome, TryLater)
    assert outcome.error is error
    assert outcome.cost == ItemCost(1, 120, 800, 1)


def test_an_llm_error_that_will_not_pass_fails_the_item_with_its_reason() -> None:
    outcome = _one(PermanentGenerationError("ValidationException: content filtered"))

    assert outcome == FailedForGood("ValidationException: content filtered", ItemCost(1, 0, 0, 0))


@pytest.mark.parametrize(
    ("failure", "named"),
    [
        (MalformedOutputError("no tool call in the answer", usage=USAGE), "malformed output"),
        (KeyError("questions"), "generator failed: KeyError"),
        (ValueError("a bug in a generator"), "generator failed: ValueError"),
    ],
    ids=["malformed-answer", "generator-bug-keyerror", "generator-bug-valueerror"],
)
def test_an_invalid_answer_or_a_generator_bug_is_tried_again_up_to_its_bound(
    failure: Exception, named: str
) -> None:
    # WHEN the same item fails so on each delivery
    outcomes = [_one(failure, attempts) for attempts in range(1, MALFORMED_OUTPUT_ATTEMPTS + 1)]

    # THEN it is tried again until its bound, then failed for good, its reason naming why
    *before, last = outcomes
    assert all(isinstance(outcome, TryLater) for outcome in before)
    assert all(isinstance(o.error, MalformedOutputError) for o in before if isinstance(o, TryLater))
    assert isinstance(last, FailedForGood)
    assert named in last.reason
    assert f"on {MALFORMED_OUTPUT_ATTEMPTS} attempts" in last.reason
    # every attempt was a call, counted
    assert all(outcome.cost.llm_calls == 1 for outcome in outcomes)


def _request(message_id: str, concept_id: str, *types: ContentType) -> MessageRequest:
    return MessageRequest(
        message_id=message_id,
        task_id="task",
        roadmap_id="roadmap",
        concept=Concept(concept_id=concept_id, name=concept_id),
        preferences=Preferences(),
        items=[ItemToGenerate(content_type, attempts=1) for content_type in types],
    )


def test_too_little_time_left_starts_no_call_and_sends_the_record_back() -> None:
    generator = CountingGenerator()
    batch = BatchGeneration(
        generator, parallelism=8, seconds_left=lambda: 20.0, call_budget_seconds=60.0
    )

    results = dict(batch.run([_request("m1", "c1", T, R)]))

    assert generator.calls == []
    result = results["m1"]
    assert isinstance(result.try_later, NotEnoughTimeError)
    assert result.generated == {}
    assert result.costs == {T: NOT_CALLED, R: NOT_CALLED}


def test_once_an_item_must_come_back_its_messages_unstarted_items_are_not_called() -> None:
    # GIVEN one message of three items whose first fails transiently, called one by one
    generator = CountingGenerator()
    generator.failures[("c1", T.value)] = TransientGenerationError("ReadTimeout")
    batch = BatchGeneration(
        generator, parallelism=1, seconds_left=lambda: 900.0, call_budget_seconds=60.0
    )

    # WHEN the batch runs it beside another message
    results = dict(batch.run([_request("m1", "c1", T, R, Q), _request("m2", "c2", T)]))

    # THEN m1's other items were never paid for (its record comes back anyway); m2 was generated
    assert generator.calls == [("c1", T.value), ("c2", T.value)]
    assert isinstance(results["m1"].try_later, TransientGenerationError)
    assert results["m1"].costs[R] == NOT_CALLED
    assert set(results["m2"].generated) == {T}


def test_a_message_with_nothing_to_generate_is_answered_at_once() -> None:
    batch = BatchGeneration(
        CountingGenerator(), parallelism=8, seconds_left=lambda: 900.0, call_budget_seconds=60.0
    )

    results = list(batch.run([_request("m1", "c1")]))

    assert [message_id for message_id, _ in results] == ["m1"]
    assert results[0][1].generated == {} and results[0][1].try_later is None
