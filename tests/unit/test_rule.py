"""The retry rule alone, without a database: every row of the rule's table."""

from __future__ import annotations

import pytest

from content_retry.plan import Decision, Reason, judge_item
from tests.rule_table import RULE

LATEST_STATUS = {"none": None, "completed": "completed", "failed": "failed"}


@pytest.mark.parametrize(("state", "expected"), RULE.items(), ids=str)
def test_every_row_of_the_rule(
    state: tuple[str | None, str, str], expected: tuple[str | None, str | None]
) -> None:
    framework_status, latest, claim = state
    reason, framework_after = expected

    judgement = judge_item(framework_status, LATEST_STATUS[latest], claimed=claim == "live")

    assert (judgement.reason.value if judgement.reason else None) == reason
    assert (judgement.decision is Decision.RETRY) == (reason is not None)
    if latest == "completed":
        assert judgement.decision is Decision.COMPLETED
    repaired = framework_after != framework_status
    assert judgement.repair_framework_status is repaired


@pytest.mark.parametrize("framework_status", ["something-else", "PROCESSING", ""])
def test_a_status_the_rule_does_not_know_is_no_reason(framework_status: str) -> None:
    # An unknown framework status neither hides an item nor names its reason.
    judgement = judge_item(framework_status, None, claimed=False)

    assert (judgement.decision, judgement.reason) == (Decision.RETRY, Reason.MISSING)
    assert judge_item(framework_status, "completed", claimed=False).repair_framework_status is False
