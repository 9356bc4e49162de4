"""The judge's plan from its items' states alone, without a database."""

from __future__ import annotations

from typing import Any

import pytest

from content_retry.concepts import MAX_ID_LENGTH
from content_retry.content_types import ContentType
from content_retry.plan import Reason, plan_from_rows
from content_retry.plan.models import HeldItem

T, R, Q = ContentType.TUTORIAL, ContentType.RESOURCES, ContentType.QUIZ


def state(
    concept_id: str,
    content_type: ContentType,
    framework: str | None = None,
    latest: str | None = None,
    *,
    claimed: bool = False,
    waiting: bool = False,
    name: str | None = "Name",
) -> tuple[Any, ...]:
    """One row of the item state query, its columns in order."""
    return (
        content_type.value,
        concept_id,
        name,
        "about it",
        "Stage",
        "Module",
        framework,
        latest,
        claimed,
        waiting,
    )


def planned(rows: list[tuple[Any, ...]]) -> list[tuple[str, str, str]]:
    judged = plan_from_rows(rows)
    return [
        (plan.concept.concept_id, item.content_type.value, item.reason.value)
        for plan in judged.concepts.values()
        for item in plan.items
    ]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        pytest.param([], [], id="a healthy roadmap: no rows, nothing planned"),
        pytest.param(
            [state("c1", T), state("c1", Q, "failed"), state("c2", R, "processing")],
            [("c1", "tutorial", "missing"), ("c1", "quiz", "failed"), ("c2", "resources", "stale")],
            id="each item with its reason, in the rows' order",
        ),
        pytest.param(
            [state("c1", T, "completed", "completed"), state("c1", R, None, "failed")],
            [("c1", "resources", "failed")],
            id="a completed item is not planned",
        ),
        pytest.param(
            [state("c1", T, claimed=True), state("c2", T)],
            [("c2", "tutorial", "missing")],
            id="a claimed item is held",
        ),
        pytest.param(
            [state("c1", T, "failed"), state("c1", T, "processing")],
            [("c1", "tutorial", "failed")],
            id="a concept listed twice: its first state counts",
        ),
        pytest.param(
            [state("", T), state("x" * (MAX_ID_LENGTH + 1), T), state("c3", T)],
            [("c3", "tutorial", "missing")],
            id="ids no retry message can carry are left out",
        ),
    ],
)
def test_the_plan_holds_what_the_rule_plans(
    rows: list[tuple[Any, ...]], expected: list[tuple[str, str, str]]
) -> None:
    assert planned(rows) == expected


def test_items_of_one_concept_form_one_concept_plan() -> None:
    judged = plan_from_rows([state("c1", T, name=None), state("c1", Q, "failed")])

    (plan,) = judged.concepts.values()
    assert plan.concept.name == "c1"  # a concept without a name is named by its id
    assert [(item.content_type, item.reason) for item in plan.items] == [
        (T, Reason.MISSING),
        (Q, Reason.FAILED),
    ]


@pytest.mark.parametrize(
    ("framework", "repaired"),
    [(None, True), ("failed", True), ("completed", False), ("pending", False)],
)
def test_a_completed_latest_row_repairs_a_null_or_failed_framework_status(
    framework: str | None, repaired: bool
) -> None:
    judged = plan_from_rows([state("c1", R, framework, "completed")])

    assert judged.repairs == ({"c1": {"resources_status": "completed"}} if repaired else {})
    assert judged.concepts == {}


def test_held_items_are_counted_and_listed_only_when_asked() -> None:
    rows = [
        state("c1", T, claimed=True, waiting=True),
        state("c1", Q, claimed=True),
        state("c2", T),
    ]

    counted = plan_from_rows(rows)
    listed = plan_from_rows(rows, list_held=True)

    assert (counted.claimed, counted.waiting, counted.held) == (2, 1, [])
    assert listed.held == [HeldItem("c1", T, True), HeldItem("c1", Q, False)]


def test_an_item_held_by_several_claims_counts_once() -> None:
    # The state query returns one row per live claim, a waiting one first.
    judged = plan_from_rows(
        [state("c1", T, claimed=True, waiting=True), state("c1", T, claimed=True)],
        list_held=True,
    )

    assert (judged.claimed, judged.waiting) == (1, 1)
    assert judged.held == [HeldItem("c1", T, True)]


def test_an_unplannable_concept_is_reported_once() -> None:
    judged = plan_from_rows([state("", T), state("", Q)])

    assert judged.unplannable == {""}
    assert judged.concepts == {}
