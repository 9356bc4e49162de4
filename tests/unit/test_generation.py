"""The generate function's failure table (DESIGN §6), for the LLM's part: no
database, no queue, no network. What each kind of generator outcome becomes,
and how a batch's calls run."""

from __future__ import annotations

import pytest

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.costs import NOT_CALLED, ItemCost
from content_retry.deadlines import Deadline
from content_retry.generated import TutorialContent
from content_retry.generation import (
    MALFORMED_OUTPUT_CALLS,
    THROTTLED_DELAY_SECONDS,
    BatchGeneration,
    FailedPermanently,
    Generated,
    ItemOutcome,
    ItemToGenerate,
    MessageRequest,
    NotCalledError,
    NotEnoughTimeError,
    PacedError,
    TryLater,
    generate_item,
)
from content_retry.generators import (
    ConfigurationError,
    MalformedOutputError,
    PermanentGenerationError,
    ThrottledError,
    TransientGenerationError,
    Usage,
)
from content_retry.messages import Preferences
from content_retry.pacing import Grant
from tests.support import CountingGenerator

T, R, Q = ContentType.TUTORIAL, ContentType.RESOURCES, ContentType.QUIZ
USAGE = Usage(input_tokens=120, output_tokens=800, throttled_attempts=1)
CONCEPT = Concept(concept_id="c1", name="Closures")


def _one(failure: Exception | None, calls: int = 1) -> ItemOutcome:
    generator = CountingGenerator(usage=USAGE)
    if failure is not None:
        generator.failures[("c1", T.value)] = failure
    return generate_item(generator, CONCEPT, T, Preferences(), calls=calls)


def _seconds(left: float) -> Deadline:
    return Deadline(lambda: left, reserve_seconds=0)


def test_content_generated_is_kept_with_what_the_call_cost() -> None:
    outcome = _one(None)

    assert isinstance(outcome, Generated)
    assert isinstance(outcome.content, TutorialContent)
    assert outcome.cost == ItemCost(1, 120, 800, 1)


def test_an_llm_error_that_may_pass_is_tried_later_and_its_cost_kept() -> None:
    error = TransientGenerationError("ModelTimeoutException: too slow", usage=USAGE)

    outcome = _one(error)

    assert isinstance(outcome, TryLater)
    assert outcome.error is error
    assert outcome.cost == ItemCost(1, 120, 800, 1)


def test_an_llm_error_that_will_not_pass_fails_the_item_with_its_reason() -> None:
    outcome = _one(PermanentGenerationError("ValidationException: content filtered"))

    assert outcome == FailedPermanently(
        "ValidationException: content filtered", ItemCost(1, 0, 0, 0)
    )


def test_a_throttled_call_waits_a_short_delay_and_counts_no_llm_call() -> None:
    error = ThrottledError("ThrottlingException: slow down", usage=Usage(throttled_attempts=2))

    outcome = _one(error)

    assert outcome == TryLater(error, ItemCost(throttled_attempts=2), THROTTLED_DELAY_SECONDS)
    assert outcome.cost.llm_calls == 0


def test_a_configuration_fault_is_no_item_failure_and_costs_no_call() -> None:
    error = ConfigurationError("AccessDeniedException: not allowed")

    outcome = _one(error)

    assert isinstance(outcome, TryLater) and outcome.error is error
    assert outcome.cost.llm_calls == 0


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
    # WHEN the same item fails so on each of its LLM calls
    outcomes = [_one(failure, calls) for calls in range(1, MALFORMED_OUTPUT_CALLS + 1)]

    # THEN it is tried again until its bound, then failed permanently, its reason naming why
    *before, last = outcomes
    assert all(isinstance(outcome, TryLater) for outcome in before)
    assert all(isinstance(o.error, MalformedOutputError) for o in before if isinstance(o, TryLater))
    assert isinstance(last, FailedPermanently)
    assert named in last.reason
    assert f"on {MALFORMED_OUTPUT_CALLS} LLM calls" in last.reason
    # every attempt was a call, counted
    assert all(outcome.cost.llm_calls == 1 for outcome in outcomes)


def _request(message_id: str, concept_id: str, *types: ContentType) -> MessageRequest:
    return MessageRequest(
        message_id=message_id,
        task_id="task",
        roadmap_id="roadmap",
        concept=Concept(concept_id=concept_id, name=concept_id),
        preferences=Preferences(),
        items=[ItemToGenerate(content_type) for content_type in types],
    )


def test_too_little_time_left_starts_no_call_and_sends_the_record_back() -> None:
    generator = CountingGenerator()
    batch = BatchGeneration(
        generator, parallelism=8, deadline=_seconds(20.0), call_budget_seconds=60.0
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
        generator, parallelism=1, deadline=_seconds(900.0), call_budget_seconds=60.0
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
        CountingGenerator(), parallelism=8, deadline=_seconds(900.0), call_budget_seconds=60.0
    )

    results = list(batch.run([_request("m1", "c1")]))

    assert [message_id for message_id, _ in results] == ["m1"]
    assert results[0][1].generated == {} and results[0][1].try_later is None


class ReservingGenerator(CountingGenerator):
    """A generator of a metered model: it names the model and what a call reserves."""

    model_id = "model"

    def reservation(self, *_: object) -> int:
        return 1_000


class ScriptedPacer:
    """The shared quota, granting from a script; records what was asked."""

    def __init__(self, *grants: Grant) -> None:
        self.grants = list(grants)
        self.asked: list[tuple[int, int, bool]] = []

    def grant(self, calls: int, tokens_per_call: int, *, throttled: bool) -> Grant:
        self.asked.append((calls, tokens_per_call, throttled))
        return self.grants.pop(0) if self.grants else Grant(calls, 0.0)


def test_calls_start_as_the_quota_grants_them_and_wait_for_the_rest() -> None:
    # GIVEN a quota with room for one call now, and for the other a moment later
    generator = ReservingGenerator()
    pacer = ScriptedPacer(Grant(1, 0.05), Grant(1, 0.0))
    batch = BatchGeneration(
        generator, parallelism=8, deadline=_seconds(900.0), call_budget_seconds=60.0, pacer=pacer
    )

    # WHEN a message of two items runs
    results = dict(batch.run([_request("m1", "c1", T, R)]))

    # THEN both were generated, one after the pace's wait, each reserving its tokens
    assert set(results["m1"].generated) == {T, R}
    assert pacer.asked == [(2, 1_000, False), (1, 1_000, False)]
    assert batch.paced_calls == 1


def test_a_quota_without_room_before_the_deadline_sends_the_record_back_with_its_delay() -> None:
    generator = ReservingGenerator()
    pacer = ScriptedPacer(Grant(0, 45.0))
    batch = BatchGeneration(
        generator, parallelism=8, deadline=_seconds(100.0), call_budget_seconds=60.0, pacer=pacer
    )

    results = dict(batch.run([_request("m1", "c1", T)]))

    assert generator.calls == []
    assert isinstance(results["m1"].try_later, PacedError)
    assert results["m1"].delay_seconds == 45.0
    assert results["m1"].costs == {T: NOT_CALLED}


def test_a_throttled_call_waits_once_for_the_shared_pace_which_learns_of_it() -> None:
    # GIVEN two messages, the first one's call throttled by the LLM once
    generator = ReservingGenerator()
    generator.failures[("c1", T.value)] = ThrottledError(
        "ThrottlingException", usage=Usage(throttled_attempts=2)
    )
    pacer = ScriptedPacer(Grant(1, 0.01))
    batch = BatchGeneration(
        generator, parallelism=1, deadline=_seconds(900.0), call_budget_seconds=60.0, pacer=pacer
    )

    def answer_next_time(*_: str) -> None:
        if generator.calls[-1] == ("c1", T.value) and len(generator.calls) > 1:
            generator.failures.pop(("c1", T.value), None)

    generator.before_call = answer_next_time

    # WHEN the batch runs
    results = dict(batch.run([_request("m1", "c1", T), _request("m2", "c2", T)]))

    # THEN the throttled call went back to wait for the pace (told of the
    # throttle at its next take) and was made again in this invocation
    assert pacer.asked[1][2] is True
    assert generator.calls.count(("c1", T.value)) == 2
    assert set(results["m1"].generated) == {T}
    assert set(results["m2"].generated) == {T}
    # its throttled attempts are counted with the item, no extra paid call
    assert results["m1"].costs[T].throttled_attempts == 2
    assert results["m1"].costs[T].llm_calls == 1


def test_a_call_throttled_twice_comes_back_with_a_short_delay_and_the_pace_is_told() -> None:
    generator = ReservingGenerator()
    generator.failures[("c1", T.value)] = ThrottledError("ThrottlingException")
    pacer = ScriptedPacer()
    batch = BatchGeneration(
        generator, parallelism=1, deadline=_seconds(900.0), call_budget_seconds=60.0, pacer=pacer
    )

    results = dict(batch.run([_request("m1", "c1", T)]))

    assert generator.calls == [("c1", T.value)] * 2
    assert isinstance(results["m1"].try_later, ThrottledError)
    assert results["m1"].delay_seconds == THROTTLED_DELAY_SECONDS
    # the second throttle reached the shared pace by a take of no call
    assert pacer.asked[-1] == (0, 1, True)


def test_a_configuration_fault_stops_every_later_call_of_the_batch() -> None:
    generator = CountingGenerator()
    generator.failures[("c1", T.value)] = ConfigurationError("AccessDeniedException")
    batch = BatchGeneration(
        generator, parallelism=1, deadline=_seconds(900.0), call_budget_seconds=60.0
    )

    results = dict(batch.run([_request(f"m{i}", f"c{i}", T) for i in (1, 2, 3)]))

    assert generator.calls == [("c1", T.value)]
    assert all(isinstance(r.try_later, ConfigurationError) for r in results.values())


def test_no_call_starts_once_the_database_has_failed() -> None:
    generator = CountingGenerator()
    batch = BatchGeneration(
        generator,
        parallelism=8,
        deadline=_seconds(900.0),
        call_budget_seconds=60.0,
        stop_reason=lambda: "the database failed earlier in this invocation",
    )

    results = dict(batch.run([_request("m1", "c1", T, R)]))

    assert generator.calls == []
    assert isinstance(results["m1"].try_later, NotCalledError)
    assert results["m1"].costs == {T: NOT_CALLED, R: NOT_CALLED}
