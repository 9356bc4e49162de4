"""Reads template.yaml, so local queues and tests take their settings from it."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from content_retry_local.project import project_path

# CloudFormation queue properties that SQS's CreateQueue takes as attributes.
_QUEUE_ATTRIBUTES = (
    "DelaySeconds",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "ReceiveMessageWaitTimeSeconds",
    "VisibilityTimeout",
)


class _Tagged:
    """An intrinsic function (``!Ref X``) kept as data: tag and value."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag = tag
        self.value = value

    def __repr__(self) -> str:
        return f"{self.tag} {self.value!r}"


def template_path() -> Path:
    """The project's template.yaml."""
    return project_path("template.yaml")


@lru_cache(maxsize=4)
def load_template(path: Path | None = None) -> dict[str, Any]:
    """The template as data (the project's, by default); intrinsic functions
    become :class:`_Tagged` values."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def intrinsic(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> _Tagged:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
        return _Tagged("!" + tag_suffix, value)

    Loader.add_multi_constructor("!", intrinsic)
    # A SafeLoader subclass that only adds constructors for intrinsic tags.
    template: dict[str, Any] = yaml.load((path or template_path()).read_text(), Loader=Loader)  # noqa: S506  # nosec B506
    return template


def resource(logical_id: str, path: Path | None = None) -> dict[str, Any]:
    """One resource's definition (``Type``, ``Properties``, ...)."""
    definition: dict[str, Any] = load_template(path)["Resources"][logical_id]
    return definition


def queue_attributes(
    logical_id: str, *, dead_letter_arn: str | None = None, source_arn: str | None = None
) -> dict[str, str]:
    """CreateQueue attributes for a queue of the template.

    Args:
        logical_id: ``RetryQueue`` or ``RetryDLQ``.
        dead_letter_arn: the local dead-letter queue's ARN, put where the
            template's RedrivePolicy names its dead-letter queue.
        source_arn: the local source queue's ARN, for a RedriveAllowPolicy.
    """
    properties = resource(logical_id)["Properties"]
    attributes = {name: str(properties[name]) for name in _QUEUE_ATTRIBUTES if name in properties}
    redrive = properties.get("RedrivePolicy")
    if redrive is not None:
        if dead_letter_arn is None:
            raise ValueError(f"{logical_id} has a RedrivePolicy; give dead_letter_arn")
        attributes["RedrivePolicy"] = json.dumps(
            {
                "deadLetterTargetArn": dead_letter_arn,
                "maxReceiveCount": int(redrive["maxReceiveCount"]),
            }
        )
    allow = properties.get("RedriveAllowPolicy")
    if allow is not None and source_arn is not None:
        attributes["RedriveAllowPolicy"] = json.dumps(
            {"redrivePermission": allow["redrivePermission"], "sourceQueueArns": [source_arn]}
        )
    return attributes


def create_queues(sqs: Any, *, prefix: str = "content-retry-local") -> tuple[str, str]:
    """Create (or find) the retry queue and its DLQ as template.yaml defines them.

    Returns:
        (retry queue URL, dead-letter queue URL).
    """
    dlq_url: str = sqs.create_queue(
        QueueName=f"{prefix}-dlq", Attributes=queue_attributes("RetryDLQ")
    )["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue_url: str = sqs.create_queue(
        QueueName=prefix, Attributes=queue_attributes("RetryQueue", dead_letter_arn=dlq_arn)
    )["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    allow = queue_attributes("RetryDLQ", source_arn=queue_arn).get("RedriveAllowPolicy")
    if allow:
        sqs.set_queue_attributes(QueueUrl=dlq_url, Attributes={"RedriveAllowPolicy": allow})
    return queue_url, dlq_url
