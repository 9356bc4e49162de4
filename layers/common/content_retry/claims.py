"""What holds an item back from being planned again: a live claim (DESIGN §4).

The judge leaves claimed items out, and the sweep leaves out roadmaps with
claimed items: both read the claim from the ledger by this one predicate.
"""

from __future__ import annotations

from content_retry.statuses import CLAIMING_STATUSES, ItemStatus, sql_list


def live_claim(alias: str) -> str:
    """SQL: whether the ``retry_items`` row aliased ``alias`` holds a live claim (DESIGN §4).

    A queued or running item is claimed while its message may be waiting in
    the queue: from its send until the queue's retention has dropped it
    (``:retention_minutes``), however deep the backlog; an item whose message
    was never sent (a crash between commit and send) only for the lease after
    it was planned or started (``:lease_minutes``), then it is planned again.
    An item dead-lettered with its generated content is claimed while that
    copy can be in the dead-letter queue: the re-drive saves it, unpaid.
    """
    return (
        f"(({alias}.status IN ({sql_list(CLAIMING_STATUSES)}) AND ("
        f"{alias}.claimed_at > now() - make_interval(mins => :lease_minutes) OR "
        f"{alias}.sent_at > now() - make_interval(mins => :retention_minutes))) OR "
        f"({alias}.status = '{ItemStatus.DEAD_LETTERED}' AND {alias}.content_in_dlq_until > now()))"
    )


def waiting_for_redrive(alias: str) -> str:
    """SQL: whether the row's claim is its content waiting in the dead-letter queue."""
    return (
        f"({alias}.status = '{ItemStatus.DEAD_LETTERED}' AND {alias}.content_in_dlq_until > now())"
    )
