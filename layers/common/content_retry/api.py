"""The HTTP API of the detect function (DESIGN §6), on Powertools' REST resolver.

Routes validate their input with pydantic models (which also generate the
OpenAPI document), take the caller from the API Gateway authorizer, and call
one function of :mod:`content_retry.retries`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Body, Path, Query
from aws_lambda_powertools.event_handler.openapi.types import (
    OpenAPIResponse,
    OpenAPIResponseHeader,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field

from content_retry import __version__, deadlines
from content_retry.concepts import MAX_ID_LENGTH
from content_retry.content_types import ContentType, UnknownContentTypeError
from content_retry.database import DATABASE_ERRORS
from content_retry.messages import Preferences
from content_retry.observability import logger
from content_retry.plan import RoadmapNotFoundError
from content_retry.plan_view import RetryPlanView, preview_retry
from content_retry.request_body import BodyError, read_body
from content_retry.retries import DetectDependencies, start_retry
from content_retry.tasks import TaskView, task_for_owner
from content_retry.validation import clip_error, describe_errors

# API Gateway ends a REST integration after 29 s (its integration timeout) and
# answers 504 itself: the function must answer first, whatever the database
# does. The API path's work gets at most API_AT_MOST_SECONDS from the request's
# start, less API_RESERVE_SECONDS kept to build the answer: every connect and
# statement is bounded by what is left (content_retry.database.engine), so the
# answer leaves by 25 s, with the rest of the 29 s for Lambda and API Gateway.
API_GATEWAY_TIMEOUT_SECONDS = 29
API_AT_MOST_SECONDS = 27
API_RESERVE_SECONDS = 2
# A 503 for a database that failed or did not answer in time asks the caller
# to wait this long (Retry-After): an RDS Proxy borrow or failover passes in
# about that time, and asking sooner would only wait on it again.
DATABASE_RETRY_AFTER_SECONDS = 30

RoadmapId = Annotated[str, Path(min_length=1, description="The roadmap's id")]
TaskId = Annotated[str, Path(min_length=1, description="A task id from a 202")]


class RetryRequest(BaseModel):
    """Body of ``POST /roadmaps/{roadmap_id}/retry``; every field is optional."""

    model_config = ConfigDict(extra="forbid")

    content_types: Annotated[
        list[ContentType] | None,
        Field(min_length=1, max_length=10, description="Default: every content type"),
    ] = None
    preferences: Preferences | None = None


class RetryResponse(BaseModel):
    success: bool
    task_id: str | None
    retried_count: Annotated[int, Field(description="Items (concept x content type) queued")]
    items: dict[str, int]
    reasons: dict[str, int]
    waiting_for_redrive: Annotated[
        int,
        Field(
            description="Items not planned because their generated content waits in the "
            "dead-letter queue: the next re-drive saves them without calling the LLM"
        ),
    ] = 0
    message: str


class ErrorResponse(BaseModel):
    success: bool = False
    message: str
    errors: list[str] = Field(default_factory=list)


def _error(status: int, message: str, errors: list[str] | None = None) -> Response[ErrorResponse]:
    return Response(
        status_code=status,
        content_type="application/json",
        body=ErrorResponse(message=message, errors=errors or []),
    )


def _json(status: int, body: BaseModel, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(status_code=status, content_type="application/json", body=body, headers=headers)


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)}


_RETRY_AFTER: dict[str, OpenAPIResponseHeader] = {
    "Retry-After": {
        "description": "Seconds to wait before asking again",
        "schema": {"type": "integer"},
    }
}
_DATABASE_NOT_ANSWERING = (
    "The database failed or did not answer in time; ask again after Retry-After seconds"
)
_ERRORS: dict[int, OpenAPIResponse] = {
    401: {
        "description": "No caller identity",
        "content": {"application/json": {"model": ErrorResponse}},
    },
    404: {
        "description": "Unknown, or not the caller's (never told apart)",
        "content": {"application/json": {"model": ErrorResponse}},
    },
    503: {
        "description": _DATABASE_NOT_ANSWERING,
        "headers": _RETRY_AFTER,
        "content": {"application/json": {"model": ErrorResponse}},
    },
}

app = APIGatewayRestResolver(enable_validation=True)
app.configure_openapi(
    title="content-retry",
    version=__version__,
    description="Retry the learning content a roadmap platform failed to generate or save.",
)


@app.exception_handler(RequestValidationError)
def _invalid_request(exc: RequestValidationError) -> Response[ErrorResponse]:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return _error(400, "the request body is not valid JSON")
    details = describe_errors(errors, whole="body", skip=("body",))
    return _error(422, "the request is not valid: " + "; ".join(details), details)


@app.exception_handler(UnknownContentTypeError)
def _unknown_content_type(exc: UnknownContentTypeError) -> Response[ErrorResponse]:
    return _error(422, str(exc), [str(exc)])


class TaskNotFoundError(LookupError):
    """No such task, or not the caller's (the two are not told apart)."""


@app.exception_handler(TaskNotFoundError)
def _task_not_found(exc: TaskNotFoundError) -> Response[ErrorResponse]:
    return _error(404, "task not found")


@app.not_found
def _no_such_route(exc: Exception) -> Response[ErrorResponse]:
    # Also what a roadmap id no route can match (a '"' or '/', say) gets: an
    # unknown roadmap, in the same words as any other.
    return _error(404, "not found")


@app.exception_handler(RoadmapNotFoundError)
def _roadmap_not_found(exc: RoadmapNotFoundError) -> Response[ErrorResponse]:
    return _error(404, "roadmap not found")


@app.exception_handler(list(DATABASE_ERRORS))
def _database_not_answering(exc: Exception) -> Response[ErrorResponse]:
    # Any route's database failure: an error, a hang cut off by the deadline,
    # or too little time left to start a statement. Never a 502: a 503 the
    # caller can act on. What failed is in the log, not the answer.
    logger.error("api_database_unavailable", extra={"error": clip_error(repr(exc))})
    message = (
        "the database is not answering: retry later "
        f"(in {DATABASE_RETRY_AFTER_SECONDS} seconds, as Retry-After says)"
    )
    return Response(
        status_code=503,
        content_type="application/json",
        body=ErrorResponse(message=message),
        headers=_retry_after(),
    )


def caller_identity(event: dict[str, Any]) -> str | None:
    """The signed-in caller: Cognito's ``claims.sub``, else the authorizer's ``principalId``.

    Only the authorizer API Gateway ran is trusted; nothing in the request's
    headers or body can name the caller.
    """
    authorizer = (event.get("requestContext") or {}).get("authorizer") or {}
    if not isinstance(authorizer, dict):
        return None
    claims = authorizer.get("claims") or {}
    subject = claims.get("sub") if isinstance(claims, dict) else None
    identity = subject or authorizer.get("principalId")
    return identity if isinstance(identity, str) and identity else None


def _caller() -> str:
    identity = caller_identity(app.current_event.raw_event)
    # handle_api_event answered 401 before routing when there is none
    assert identity is not None
    return identity


def _deps() -> DetectDependencies:
    deps: DetectDependencies = app.context["deps"]
    return deps


@app.post(
    "/roadmaps/<roadmap_id>/retry",
    summary="Retry what is missing, failed or stale in a roadmap",
    responses={
        202: {
            "description": "Retry queued",
            "content": {"application/json": {"model": RetryResponse}},
        },
        200: {
            "description": "Nothing needs retry (or it is already queued)",
            "content": {"application/json": {"model": RetryResponse}},
        },
        400: {
            "description": "Body is not JSON",
            "content": {"application/json": {"model": ErrorResponse}},
        },
        422: {
            "description": "Invalid body",
            "content": {"application/json": {"model": ErrorResponse}},
        },
        **_ERRORS,
        503: {
            "description": "Nothing was queued: the database failed or did not answer in "
            "time (an ErrorResponse), or the queue refused every message (a RetryResponse); "
            "ask again after Retry-After seconds",
            "headers": _RETRY_AFTER,
            "content": {"application/json": {"model": ErrorResponse | RetryResponse}},
        },
    },
)
def request_retry(
    roadmap_id: RoadmapId, body: Annotated[RetryRequest | None, Body()] = None
) -> Response[RetryResponse]:
    if len(roadmap_id) > MAX_ID_LENGTH:  # longer than any roadmap the pipeline can plan
        raise RoadmapNotFoundError(roadmap_id)
    request = body or RetryRequest()
    outcome = start_retry(
        _deps(),
        roadmap_id,
        content_types=[item.value for item in request.content_types]
        if request.content_types
        else None,
        preferences=request.preferences,
        owner=_caller(),
        trigger="api",
    )
    answer = RetryResponse.model_validate(outcome.as_response())
    if outcome.task_id is None:
        return _json(200, answer)
    if outcome.retried_count == 0:
        return _json(503, answer, _retry_after())
    # Queued: a 202, even when the database failed after the commit and the
    # send was not recorded (start_retry): the messages are in the queue, and
    # a 503 would ask the caller again for what is already on its way.
    return _json(202, answer)


@app.get(
    "/roadmaps/<roadmap_id>/retry-plan",
    summary="What a retry would plan now, and what it would cost; nothing is claimed or sent",
    responses={
        200: {
            "description": "The plan a retry would make now, and its estimate",
            "content": {"application/json": {"model": RetryPlanView}},
        },
        422: {
            "description": "Invalid query (an unknown content type names the valid ones)",
            "content": {"application/json": {"model": ErrorResponse}},
        },
        **_ERRORS,
    },
)
def get_retry_plan(
    roadmap_id: RoadmapId,
    content_types: Annotated[
        str | None,
        Query(
            description="Comma-separated content types (tutorial, resources, quiz); "
            "default: every content type",
            max_length=200,
        ),
    ] = None,
) -> Response[RetryPlanView]:
    if len(roadmap_id) > MAX_ID_LENGTH:  # longer than any roadmap the pipeline can plan
        raise RoadmapNotFoundError(roadmap_id)
    names = None if content_types is None else [n.strip() for n in content_types.split(",")]
    view = preview_retry(_deps(), roadmap_id, content_types=names, owner=_caller())
    return _json(200, view)


@app.get(
    "/retry-tasks/<task_id>",
    summary="A retry task's progress, item by item",
    responses={
        200: {"description": "The task", "content": {"application/json": {"model": TaskView}}},
        **_ERRORS,
    },
)
def get_retry_task(task_id: TaskId) -> Response[TaskView]:
    task = task_for_owner(_deps().engine, task_id, _caller())
    if task is None:
        raise TaskNotFoundError(task_id)
    return _json(200, task)


def handle_api_event(
    event: dict[str, Any], context: LambdaContext | None, deps: DetectDependencies
) -> dict[str, Any]:
    """Answer one API Gateway REST proxy event, within API Gateway's 29 s.

    The caller, then the body (:func:`content_retry.request_body.read_body`),
    are checked before routing: a request without identity gets 401 whatever
    else is wrong with it, and a body no parser should see gets its 400 or 413.
    The route runs under the API's deadline (API_AT_MOST_SECONDS, read when
    called), and a database that fails or runs out of it gets a 503.
    """
    if caller_identity(event) is None:
        return _raw(401, ErrorResponse(message="no caller identity: sign in"))
    try:
        body = read_body(event.get("body"), is_base64=bool(event.get("isBase64Encoded")))
    except BodyError as exc:
        return _raw(exc.status, ErrorResponse(message=str(exc), errors=[str(exc)]))
    # The resolver gets the body as checked text, never to be decoded again.
    event = {**event, "body": body, "isBase64Encoded": False}
    if body and not _is_json(event.get("headers") or {}):
        # The body is read as JSON whatever type it was sent as (a browser's
        # fetch says text/plain): not JSON is a 400, as for any other body.
        event = {**event, "headers": _with_json_content_type(event.get("headers") or {})}
    deadline = deadlines.Deadline.of_context(
        context, reserve_seconds=API_RESERVE_SECONDS, at_most_seconds=API_AT_MOST_SECONDS
    )
    app.append_context(deps=deps)
    try:
        with deadlines.applied(deadline):
            return app.resolve(event, context)  # type: ignore[arg-type]
    finally:
        app.clear_context()


def _is_json(headers: dict[str, Any]) -> bool:
    """Whether a request's Content-Type is JSON (or absent: JSON is assumed)."""
    content_type = next(
        (str(value) for name, value in headers.items() if name.lower() == "content-type"), ""
    )
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type in ("", "application/json") or media_type.endswith("+json")


def _with_json_content_type(headers: dict[str, Any]) -> dict[str, Any]:
    kept = {name: value for name, value in headers.items() if name.lower() != "content-type"}
    return {**kept, "Content-Type": "application/json"}


def _raw(status: int, body: ErrorResponse) -> dict[str, Any]:
    logger.info("api_request_refused", extra={"status": status, "reason": body.message})
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json"},
        "body": body.model_dump_json(),
        "isBase64Encoded": False,
    }


def openapi_document() -> str:
    """The OpenAPI document of the routes above, as written to docs/openapi.json."""
    return json.dumps(json.loads(app.get_openapi_json_schema()), indent=2, sort_keys=True) + "\n"
