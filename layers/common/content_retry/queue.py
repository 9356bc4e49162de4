"""SQS: sending retry messages in batches, and dead-lettering with a reason."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from content_retry.messages import RetryMessage
from content_retry.validation import clip_error

# SendMessageBatch takes at most 10 entries.
BATCH_SIZE = 10
# Entries SQS reports failed are sent again this many more times before the
# concept's claim is released.
RESEND_ATTEMPTS = 2


@dataclass
class SendResult:
    sent: list[str] = field(default_factory=list)  # concept ids
    failed: dict[str, str] = field(default_factory=dict)  # concept id -> last error
    api_calls: int = 0


def send_retry_messages(
    sqs: Any,
    queue_url: str,
    messages: Sequence[RetryMessage],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> SendResult:
    """Send one message per concept, 10 per ``SendMessageBatch`` call.

    Entries that SQS reports failed are sent again (up to RESEND_ATTEMPTS
    more times, with a short backoff); a call that raises counts as every entry
    of that batch failing. Nothing raises: what could not be sent is returned,
    so the caller can release those claims.
    """
    result = SendResult()
    for start in range(0, len(messages), BATCH_SIZE):
        pending = {
            str(index): message
            for index, message in enumerate(messages[start : start + BATCH_SIZE])
        }
        for attempt in range(RESEND_ATTEMPTS + 1):
            if attempt:
                sleep(0.1 * 2**attempt)
            errors = _send_batch(sqs, queue_url, pending)
            result.api_calls += 1
            for entry_id, message in pending.items():
                if entry_id not in errors:
                    result.sent.append(message.concept.concept_id)
            pending = {entry_id: pending[entry_id] for entry_id in errors}
            if not pending:
                break
        else:
            for entry_id, message in pending.items():
                result.failed[message.concept.concept_id] = errors[entry_id]
    return result


def _send_batch(sqs: Any, queue_url: str, entries: dict[str, RetryMessage]) -> dict[str, str]:
    """Send one batch; returns the failed entry ids with their errors."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = sqs.send_message_batch(
            QueueUrl=queue_url,
            Entries=[
                {"Id": entry_id, "MessageBody": message.to_body()}
                for entry_id, message in entries.items()
            ],
        )
    except (BotoCoreError, ClientError) as exc:
        return dict.fromkeys(entries, f"{type(exc).__name__}: {exc}")
    return {
        failure["Id"]: f"{failure.get('Code', 'Error')}: {failure.get('Message', '')}".strip()
        for failure in response.get("Failed", [])
    }


class DeadLetterError(RuntimeError):
    """The dead-letter queue could not be reached: the caller must not acknowledge.

    Keeps what it could not send (the body, with any generated content, and
    its reason), so a later attempt sends that and not a poorer copy.
    """

    def __init__(
        self, problem: str, *, body: str, reason: str, detail: str, paid: str | None = None
    ) -> None:
        super().__init__(problem)
        self.body = body
        self.reason = reason
        self.detail = detail
        self.paid = paid


# The message attribute of a dead-letter copy that says what its generated
# content cost (JSON: content type -> [calls, input tokens, output tokens]):
# the save of a re-drive adds it to the ledger, whose note could not be written
# when the database failed. Attributes travel with the message on a re-drive.
PAID_ATTRIBUTE = "paid"


def dead_letter(
    sqs: Any, dlq_url: str, body: str, *, reason: str, detail: str, paid: str | None = None
) -> None:
    """Send a body to the dead-letter queue with its reason in message attributes.

    Args:
        reason: a short code an operator can filter on (``save_failed``,
            ``invalid_message``, ``not_planned``...).
        detail: what went wrong, clipped to the attribute's useful length.

    Raises:
        DeadLetterError: the dead-letter queue refused the message or was unreachable.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    attributes = {
        "reason": {"DataType": "String", "StringValue": reason},
        "error": {"DataType": "String", "StringValue": clip_error(detail) or "-"},
    }
    if paid:
        attributes[PAID_ATTRIBUTE] = {"DataType": "String", "StringValue": paid}
    try:
        sqs.send_message(QueueUrl=dlq_url, MessageBody=body, MessageAttributes=attributes)
    except (BotoCoreError, ClientError) as exc:
        raise DeadLetterError(
            f"dead-letter queue unavailable: {exc}",
            body=body,
            reason=reason,
            detail=detail,
            paid=paid,
        ) from exc
