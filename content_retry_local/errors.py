"""What the command line says when a command fails: one line, the cause and the fix."""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# Exit statuses: 2 for a configuration the command refuses before starting
# (as argparse does for bad arguments), 1 for a failure met while running.
REFUSED = 2
FAILED = 1


@dataclass(frozen=True)
class Answer:
    """What to print (after ``error: ``) and the exit status."""

    message: str
    status: int = FAILED


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: SQLAlchemy's ``orig``, ``__cause__``, ``__context__``."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        pending += [
            orig if isinstance(orig, BaseException) else None,
            current.__cause__,
            current.__context__,
        ]


def database_target() -> str:
    """Where the commands look for the database, for a message (never a password)."""
    from sqlalchemy.engine import make_url

    from content_retry.settings import get_settings

    try:
        settings = get_settings()
    except ValueError:
        return "the database"
    if settings.database_url:
        try:
            url = make_url(settings.database_url)
        except Exception:  # a URL it cannot parse is named by its own refusal
            return "DATABASE_URL"
        if url.host:
            return f"{url.host}:{url.port or 5432} (DATABASE_URL)"
        socket_path = url.query.get("unix_sock") or url.query.get("host")
        return f"{socket_path or 'the local socket'} (DATABASE_URL)"
    if settings.db_host:
        return f"{settings.db_host}:{settings.db_port} (DB_HOST, DB_PORT)"
    return "the database"


def _sqlstate(exc: BaseException) -> tuple[str, str] | None:
    """PostgreSQL's (SQLSTATE, message) from a pg8000 error, or None."""
    details = exc.args[0] if exc.args else None
    if isinstance(details, dict) and isinstance(details.get("C"), str):
        return details["C"], str(details.get("M", ""))
    return None


def statement_refusal(exc: BaseException) -> str | None:
    """PostgreSQL's refusal of a statement a person wrote (``content-retry sql``):
    its own words, not a guess at the cause; None for a connection's failure."""
    for cause in causes(exc):
        found = _sqlstate(cause)
        if found and not found[0].startswith(("08", "28", "3D", "57")):
            code, message = found
            return f"PostgreSQL refused the statement: {message} (SQLSTATE {code})"
    return None


_FIX_LOGIN = "check the user and password (DATABASE_URL, or DB_USER and DB_AUTH)"


def _refused_by_postgres(code: str, message: str) -> Answer:
    target = database_target()
    if code.startswith("28"):
        return Answer(f"{target} refused the login ({message}): {_FIX_LOGIN}")
    if code == "3D000":
        return Answer(
            f"{target}: {message}: check the database name (DATABASE_URL's path, or DB_NAME)"
        )
    if code in ("42P01", "42703"):
        return Answer(
            f"{target} has not got content-retry's schema ({message}): run "
            "`content-retry db upgrade` against it first"
        )
    if code.startswith("57P"):
        return Answer(f"{target} is shutting down or restarting ({message}): try again shortly")
    return Answer(f"{target} refused a statement ({code}: {message})")


def _unreachable(reason: BaseException) -> Answer:
    target = database_target()
    if isinstance(reason, socket.gaierror):
        why = "no such host"
    elif isinstance(reason, ssl.SSLError):
        why = f"TLS failed: {reason}"
    elif isinstance(reason, TimeoutError | socket.timeout):
        why = "no answer in time"
    else:
        why = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return Answer(
        f"cannot connect to the database at {target}: {why}. Check that it is running and "
        "reachable from here, and that DATABASE_URL (or DB_HOST and DB_PORT) names it; "
        "unset them to use the embedded PostgreSQL"
    )


def explain_database(exc: BaseException) -> Answer | None:
    """A database's refusal, or a connection that could not be made."""
    from content_retry.database import DatabaseUnavailableError

    chain = list(causes(exc))
    for cause in chain:
        found = _sqlstate(cause)
        if found:
            return _refused_by_postgres(*found)
    if not any(_is_database_error(cause) for cause in chain):
        return None
    reason = next((c for c in chain[1:] if isinstance(c, OSError)), None)
    if reason is not None or any(isinstance(c, DatabaseUnavailableError) for c in chain):
        return _unreachable(reason or exc)
    return Answer(f"the database failed: {exc}".splitlines()[0])


def _is_database_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import SQLAlchemyError

    from content_retry.database import DatabaseUnavailableError

    module = type(exc).__module__
    return isinstance(exc, SQLAlchemyError | DatabaseUnavailableError) or module.startswith(
        "pg8000"
    )


_CREDENTIAL_CODES = {
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "AuthFailure",
}
_NO_QUEUE_CODES = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}


def explain_aws(exc: BaseException) -> Answer | None:
    """AWS's refusals and failures: credentials, Region, endpoint, permissions, queues."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return Answer(_no_credentials(), REFUSED)
    if isinstance(exc, NoRegionError):
        return Answer("no AWS Region: set AWS_REGION (e.g. eu-west-1)", REFUSED)
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return Answer(
            f"cannot reach AWS at {exc.kwargs.get('endpoint_url', 'its endpoint')}: check "
            "AWS_ENDPOINT_URL (or the network and AWS_REGION)"
        )
    if isinstance(exc, ClientError):
        return _refused_by_aws(exc)
    return None


def _no_credentials() -> str:
    from content_retry.settings import get_settings

    try:
        iam = get_settings().db_auth == "iam"
    except ValueError:
        iam = False
    needs = (
        "DB_AUTH=iam signs each database login with them" if iam else "the given queues need them"
    )
    return (
        f"no AWS credentials found ({needs}): set AWS_PROFILE (after `aws sso login` if it "
        "uses SSO), or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )


def _refused_by_aws(exc: BaseException) -> Answer:
    response = getattr(exc, "response", {}) or {}
    error = response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", ""))
    operation = getattr(exc, "operation_name", "the call")
    if code in _CREDENTIAL_CODES:
        return Answer(
            f"AWS did not accept the credentials ({code}: {message}): refresh them "
            "(`aws sso login`, or new AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if code in _NO_QUEUE_CODES:
        return Answer(
            f"{operation}: the queue does not exist ({message or code}): check RETRY_QUEUE_URL "
            "and RETRY_DLQ_URL (the stack's outputs) and AWS_REGION"
        )
    if "AccessDenied" in code or code == "UnauthorizedOperation":
        return Answer(
            f"AWS refused {operation} ({code}: {message}): the credentials in use need "
            "that permission"
        )
    if code == "ResourceNotFoundException":
        return Answer(f"AWS found no such resource for {operation} ({message}): check its ARN")
    return Answer(f"AWS refused {operation} ({code}: {message})")


def explain_local(exc: BaseException) -> Answer | None:
    """The local tooling's own failures: targets, settings, project, local servers, ports."""
    from content_retry.settings import SettingsError
    from content_retry_local.aws import LocalAwsError
    from content_retry_local.environment import TargetsError
    from content_retry_local.postgres import EmbeddedPostgresError
    from content_retry_local.project import ProjectNotFoundError

    if isinstance(exc, SettingsError):
        return Answer(_settings_refused(str(exc)), REFUSED)
    if isinstance(exc, TargetsError | ProjectNotFoundError):
        return Answer(str(exc), REFUSED)
    if isinstance(exc, EmbeddedPostgresError | LocalAwsError):
        return Answer(str(exc).splitlines()[0])
    if isinstance(exc, PermissionError) and exc.filename:
        return Answer(
            f"cannot write {exc.filename}: run the command from a folder you may write in "
            "(the local commands keep their state in .local/)"
        )
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return Answer(f"the port is in use ({exc.strerror}): give another one with --port")
    return None


def _settings_refused(message: str) -> str:
    """The settings' own refusal, without pydantic's wording, with the local way out."""
    message = message.replace("Value error, ", "")
    if "DB_AUTH=" in message:
        message += "; or unset DB_AUTH and DB_* to use the embedded PostgreSQL"
    return message


EXPLAINERS: tuple[Callable[[BaseException], Answer | None], ...] = (
    explain_local,
    explain_aws,
    explain_database,
)


def explain(exc: BaseException) -> Answer:
    """One line for any failure; an unforeseen one says how to see its traceback."""
    for explainer in EXPLAINERS:
        for cause in causes(exc):
            answer = explainer(cause)
            if answer is not None:
                return answer
    return Answer(
        f"{type(exc).__name__}: {exc}".splitlines()[0]
        + " (unexpected: run again with --debug for the traceback, and report it)"
    )
