"""The retry rule alone, without a database: every state it can see."""

from __future__ import annotations

import itertools

import pytest

from content_retry.plan import Decision, Reason, judge_item

FRAMEWORK = (None, "pending", "processing", "completed", "failed", "something-else")
LATEST = (None, "completed", "failed", "pending")


@pytest.mark.parametrize(
    ("framework_status", "latest_status", "claimed"),
    list(itertools.product(FRAMEWORK, LATEST, (False, True))),
)
def test_framework_status_alone_never_decides(
    framework_status: str | None, latest_status: str | None, claimed: bool
) -> None:
    judgement = judge_item(framework_status, latest_status, claimed)

    # Whether an item is retried depends only on the tables and the claim...
    if latest_status == "completed":
        assert judgement.decision is Decision.COMPLETED
    elif claimed:
        assert judgement.decision is Decision.CLAIMED
    else:
        assert judgement.decision is Decision.RETRY
    # ...the framework status only names the reason
    if judgement.decision is Decision.RETRY:
        if "failed" in (framework_status, latest_status):
            assert judgement.reason is Reason.FAILED
        elif framework_status == "processing":
            assert judgement.reason is Reason.STALE
        else:
            assert judgement.reason is Reason.MISSING
    else:
        assert judgement.reason is None


@pytest.mark.parametrize(
    ("framework_status", "repaired"),
    [
        (None, True),
        ("failed", True),
        ("pending", False),
        ("processing", False),
        ("completed", False),
    ],
)
def test_drift_is_repaired_only_from_null_or_failed(
    framework_status: str | None, repaired: bool
) -> None:
    assert judge_item(framework_status, "completed", False).repair_framework_status is repaired
    assert judge_item(framework_status, None, False).repair_framework_status is False
