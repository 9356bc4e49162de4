"""The detect function's events: API request, schedule, or direct invoke (DESIGN §6)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from content_retry import deadlines
from content_retry.concepts import MAX_ID_LENGTH
from content_retry.content_types import ContentType
from content_retry.database import DATABASE_ERRORS
from content_retry.messages import Preferences
from content_retry.retries import (
    DatabaseNotAnsweringError,
    DetectDependencies,
    RetryOutcome,
    default_detect_dependencies,
    start_retry,
)
from content_retry.sweep import sweep
from content_retry.validation import clip_error, describe_errors

ModelT = TypeVar("ModelT", bound=BaseModel)

# A direct invoke has the function's own timeout (template.yaml's DetectFunction
# Timeout): every statement is bounded by what is left of it, less this, kept
# to log and answer. (The API's tighter deadline is content_retry.api's; the
# sweep's is content_retry.sweep's.)
DIRECT_INVOKE_RESERVE_SECONDS = 2


class InvalidEventError(ValueError):
    """The event is none of the kinds the detect function accepts."""


class DirectInvoke(BaseModel):
    """``{"roadmap_id": …, "content_types": [...], "preferences": {...}}``; trusted (IAM)."""

    model_config = ConfigDict(extra="forbid")

    roadmap_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
    content_types: Annotated[list[ContentType] | None, Field(min_length=1)] = None
    preferences: Preferences | None = None


class SweepInput(BaseModel):
    """EventBridge Scheduler's input for the sweep."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["sweep"]


def event_kind(event: Any) -> Literal["api", "schedule", "direct"]:
    """Which of the accepted kinds an event is.

    Raises:
        InvalidEventError: it is none of them; the message says what is accepted.
    """
    if isinstance(event, dict):
        if "httpMethod" in event and "requestContext" in event:
            return "api"
        if event.get("action") is not None or event.get("detail-type") == "Scheduled Event":
            return "schedule"
        if "roadmap_id" in event:
            return "direct"
    raise InvalidEventError(
        "unrecognised event; the detect function accepts an API Gateway REST proxy event, "
        'a schedule event ({"action": "sweep"} or "detail-type": "Scheduled Event"), '
        'or a direct invoke {"roadmap_id": "...", "content_types": [...], "preferences": {...}}'
    )


def handle_detect_event(
    event: Any, context: LambdaContext | None, deps: DetectDependencies | None = None
) -> dict[str, Any]:
    """Route one event to the API, the sweep, or a direct retry; return the response.

    Each runs under a deadline from ``context`` (:mod:`content_retry.deadlines`):
    the API answers a database that fails or does not answer in time with a
    503; the sweep and a direct invoke raise a clear error before the
    invocation's time runs out.

    Raises:
        InvalidEventError: the event is not one the function accepts, or a
            direct invoke / schedule input is invalid (the message says how).
        RoadmapNotFoundError: a direct invoke names an unknown roadmap.
        DatabaseNotAnsweringError: the sweep or a direct invoke met a database
            that failed or did not answer in time.
    """
    # Settings first: a function missing a variable says which, whatever the event.
    deps = deps or default_detect_dependencies()
    kind = event_kind(event)
    if kind == "api":
        from content_retry.api import handle_api_event

        return handle_api_event(event, context, deps)
    if kind == "schedule":
        if event.get("detail-type") != "Scheduled Event":
            _parse(SweepInput, event)
        return sweep(deps, _seconds_left(context)).as_response()
    return _direct_invoke(_parse(DirectInvoke, event), context, deps).as_response()


def _direct_invoke(
    request: DirectInvoke, context: LambdaContext | None, deps: DetectDependencies
) -> RetryOutcome:
    """A trusted caller's retry. A database that fails or does not answer in
    time raises DatabaseNotAnsweringError: a direct invoke has no status code
    to say 503 with, and its caller (a script, a console) sees the error and
    invokes again. Nothing is left claimed but what start_retry says."""
    deadline = deadlines.Deadline.of_context(context, reserve_seconds=DIRECT_INVOKE_RESERVE_SECONDS)
    try:
        with deadlines.applied(deadline):
            return start_retry(
                deps,
                request.roadmap_id,
                content_types=[item.value for item in request.content_types]
                if request.content_types
                else None,
                preferences=request.preferences,
                trigger="invoke",
            )
    except DATABASE_ERRORS as exc:
        raise DatabaseNotAnsweringError(
            f"the database failed or did not answer in time ({clip_error(repr(exc))}): "
            f"nothing was queued for roadmap {request.roadmap_id!r}; invoke again later"
        ) from exc


def _parse(model: type[ModelT], event: dict[str, Any]) -> ModelT:
    try:
        return model.model_validate(event)
    except ValidationError as exc:
        problems = "; ".join(describe_errors(exc.errors(), whole="event"))
        raise InvalidEventError(f"invalid {model.__name__} event: {problems}") from exc


def _seconds_left(context: LambdaContext | None) -> Callable[[], float]:
    if context is None:
        return lambda: float("inf")
    return lambda: context.get_remaining_time_in_millis() / 1000
