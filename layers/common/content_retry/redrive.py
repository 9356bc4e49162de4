"""The automatic re-drive: dead-letter copies with content back to the retry queue,
one at a time, so copies dead-lettered for themselves stay (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from typing import Any

from content_retry.deadlines import Deadline
from content_retry.messages import RetryMessage
from content_retry.observability import logger

# A receive makes the messages it leaves (those without content) invisible
# this long: the next sweep, or an operator, sees them again.
LEFT_INVISIBLE_SECONDS = 60
# Seconds a move needs at most (a receive, a send, a delete, at their worst).
MOVE_SECONDS = 15
# Receives one run makes at most: copies without content are passed over, not waited on.
MAX_RECEIVES = 50
# Copies that come back to the dead-letter queue whatever is done with them: a
# message that does not match its ledger (or whose task is gone) stays so.
NOT_REDRIVEN_REASONS = frozenset({"not_planned", "invalid_message"})


def has_generated_content(body: str) -> bool:
    """Whether a message body holds generated content (a copy a re-drive saves)."""
    try:
        return RetryMessage.model_validate_json(body).generated is not None
    except ValueError:
        return False


def _redriven(message: dict[str, Any]) -> bool:
    """Whether the sweep moves this dead-letter copy back: it carries content
    that a save can still use."""
    reason = (message.get("MessageAttributes") or {}).get("reason", {}).get("StringValue")
    return reason not in NOT_REDRIVEN_REASONS and has_generated_content(message["Body"])


def redrive_content(
    sqs: Any, dlq_url: str, queue_url: str, *, deadline: Deadline, at_most: int = 1_000
) -> int:
    """Move the dead-letter queue's copies that carry generated content back to
    the retry queue, keeping body and attributes; returns how many moved."""
    moved = 0
    for _ in range(MAX_RECEIVES):
        if moved >= at_most or deadline.left() <= MOVE_SECONDS:
            break
        messages = sqs.receive_message(
            QueueUrl=dlq_url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=LEFT_INVISIBLE_SECONDS,
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            break
        for message in filter(_redriven, messages):
            sqs.send_message(
                QueueUrl=queue_url,
                MessageBody=message["Body"],
                MessageAttributes=message.get("MessageAttributes", {}),
            )
            sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=message["ReceiptHandle"])
            moved += 1
    if moved:
        logger.info("retry_dead_letters_redriven", extra={"moved": moved})
    return moved
