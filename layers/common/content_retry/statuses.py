"""The states things are in, each vocabulary its own enum ("failed" means four
different things: a content row, a framework status, a ledger item, a plan reason)."""

from __future__ import annotations

from enum import StrEnum


class ContentStatus(StrEnum):
    """``content_status`` of a row in a content table (DESIGN §3)."""

    COMPLETED = "completed"
    FAILED = "failed"


class FrameworkStatus(StrEnum):
    """A concept's status for one content type in ``framework_data`` (null: none)."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class ItemStatus(StrEnum):
    """A ledger item's state: one planned (task, concept, content type)."""

    QUEUED = "queued"  # planned and claimed; its message is on the queue
    RUNNING = "running"  # a worker started it (an attempt was counted)
    SUCCEEDED = "succeeded"  # its content was saved for this task (or by someone else)
    FAILED = "failed"  # failed permanently, without content, with its reason
    DEAD_LETTERED = "dead_lettered"  # its message is in the dead-letter queue


# A ledger item in one of these states holds a claim on its item (DESIGN §4).
CLAIMING_STATUSES: tuple[ItemStatus, ...] = (ItemStatus.QUEUED, ItemStatus.RUNNING)
# An item in one of these states is done for its task: never generated again.
TERMINAL_STATUSES: tuple[ItemStatus, ...] = (ItemStatus.SUCCEEDED, ItemStatus.FAILED)


class TaskStatus(StrEnum):
    """A retry task's state, derived from its items when read (never stored)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    COMPLETED_WITH_FAILURES = "completed_with_failures"
