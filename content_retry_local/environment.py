"""Supplies the environment the handlers expect, when it is not given.

An embedded PostgreSQL and moto's server stand in for a database or queues not given.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from content_retry.settings import get_settings

LOCAL_STATE_DIR = Path(".local")
# The model id the local Bedrock is asked for (it answers any).
LOCAL_MODEL_ID = "local.content-retry-demo-v1"


@dataclass
class LocalEnvironment:
    database: str  # "embedded", "given" or "none"
    aws: str  # "moto (this process)", "moto (background)", "given" or "none"
    llm: str = ""  # the content generator that runs: see describe_generator
    # The embedded PostgreSQL's data folder (None: a given database, or none).
    data_dir: Path | None = None

    @property
    def all_its_own(self) -> bool:
        """Whether the database and the queues are ones this process started or
        created (the embedded PostgreSQL, moto in this process)."""
        return self.database == "embedded" and self.aws == "moto (this process)"

    def __str__(self) -> str:
        database = {
            "embedded": f"embedded PostgreSQL ({self.data_dir})",
            "given": "the given one (DATABASE_URL or DB_*)",
        }.get(self.database, self.database)
        aws = "the given endpoint and queues" if self.aws == "given" else self.aws
        described = f"database: {database}; AWS: {aws}"
        # The generator matters only to a command that may run the generate handler.
        return described if "none" in (self.database, self.aws) else f"{described}; LLM: {self.llm}"


def describe_generator() -> str:
    """The content generator the generate function will use, named."""
    settings = get_settings()
    if settings.content_generator == "template":
        return (
            "template generator (CONTENT_GENERATOR=template: offline, "
            "no model is called, no tokens are counted)"
        )
    model = settings.bedrock_model_id or "(BEDROCK_MODEL_ID not set)"
    endpoint = settings.aws_endpoint_url_bedrock_runtime
    return f"Bedrock {model} " + (f"at {endpoint}" if endpoint else f"in {settings.aws_region}")


# The variables that name a database, and those that name the queues (with the
# endpoint that serves them): each group is given whole or not at all.
DATABASE_VARIABLES = (
    "DATABASE_URL",
    "DB_HOST",
    "DB_PORT",
    "DB_NAME",
    "DB_USER",
    "DB_AUTH",
    "DB_SECRET_ARN",
)
QUEUE_VARIABLES = ("AWS_ENDPOINT_URL", "RETRY_QUEUE_URL", "RETRY_DLQ_URL")
_EMBEDDED = "unset them all to use the embedded PostgreSQL"
_MOTO = "unset them all to use a local moto server"


def given_variables() -> set[str]:
    """The database and queue variables set (to something other than empty)."""
    settings = get_settings()
    fields = type(settings).model_fields
    return {
        fields[name].alias or name.upper()
        for name in settings.model_fields_set
        if (fields[name].alias or "") in (*DATABASE_VARIABLES, *QUEUE_VARIABLES)
    }


def given_targets() -> list[str]:
    """The variables that point the local commands at a database or AWS they did
    not start (empty when the embedded PostgreSQL and moto would be used)."""
    given = given_variables()
    return [name for name in (*DATABASE_VARIABLES, *QUEUE_VARIABLES) if name in given]


class TargetsError(ValueError):
    """The variables do not name one whole database and its queues, or none."""


class MixedTargetsError(TargetsError):
    """A database and queues from two different worlds: one given, one local."""


class IncompleteTargetsError(TargetsError):
    """A database or the queues given in part: the rest would silently be local."""


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def database_problem(given: set[str]) -> str | None:
    """Why the database variables given describe no database, or None.

    ``DB_AUTH`` incomplete is refused by the settings themselves; this refuses
    what they would take silently: ``DB_*`` without ``DB_AUTH`` (the embedded
    PostgreSQL would be used instead), and ``DATABASE_URL`` beside ``DB_*``
    (one of the two ignored).
    """
    named = [name for name in DATABASE_VARIABLES if name in given and name != "DATABASE_URL"]
    if "DATABASE_URL" in given:
        if named:
            return (
                f"DATABASE_URL and {_listed(named)} are both set: give the database one way, "
                f"DATABASE_URL or DB_HOST/DB_NAME/DB_USER with DB_AUTH, not both"
            )
        return database_url_problem(get_settings().database_url or "")
    if named and "DB_AUTH" not in given:
        missing = [name for name in ("DB_HOST", "DB_NAME", "DB_USER") if name not in given]
        also = f" (and {_listed(missing)})" if missing else ""
        return (
            f"{_listed(named)} {'is' if len(named) == 1 else 'are'} set but DB_AUTH is not{also}: "
            f"set DB_AUTH=iam (or DB_AUTH=secret with DB_SECRET_ARN) with DB_HOST, DB_NAME "
            f"and DB_USER to use that database, or {_EMBEDDED}"
        )
    return None


def database_url_problem(database_url: str) -> str | None:
    """Why ``DATABASE_URL`` is not a PostgreSQL URL pg8000 can use, or None."""
    from sqlalchemy.exc import ArgumentError

    from content_retry.database.engine import normalise_database_url
    from content_retry.settings import SettingsError

    try:
        normalise_database_url(database_url)
    except (ArgumentError, SettingsError, ValueError):
        scheme, _, rest = database_url.rpartition("://")
        if "@" in rest:  # never print a password
            rest = "...@" + rest.rsplit("@", 1)[1]
        shown = f"{scheme}://{rest}" if scheme else rest
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return (
            f"DATABASE_URL ({shown}) is not a PostgreSQL URL: give "
            "postgresql://USER:PASSWORD@HOST:5432/DATABASE, or unset it to use the "
            "embedded PostgreSQL"
        )
    return None


def queues_problem(given: set[str]) -> str | None:
    """Why the queue variables given name no whole pair of queues, or None."""
    queues = [name for name in ("RETRY_QUEUE_URL", "RETRY_DLQ_URL") if name in given]
    if len(queues) == 1:
        other = "RETRY_DLQ_URL" if queues == ["RETRY_QUEUE_URL"] else "RETRY_QUEUE_URL"
        return (
            f"{queues[0]} is set but {other} is not: give both queues' URLs (the stack's "
            f"RetryQueueUrl and RetryDlqUrl outputs), or {_MOTO}"
        )
    if "AWS_ENDPOINT_URL" in given and not queues:
        return (
            "AWS_ENDPOINT_URL is set but RETRY_QUEUE_URL and RETRY_DLQ_URL are not: give "
            "that endpoint's queue URLs too, or unset AWS_ENDPOINT_URL to use a local moto server"
        )
    return None


def incomplete_targets_problem(*, database: bool, aws: bool) -> str | None:
    """What is missing from a database or queues given in part, or None; only the
    parts a command uses are checked."""
    given = given_variables()
    problems = [
        database_problem(given) if database else None,
        queues_problem(given) if aws else None,
    ]
    return next((problem for problem in problems if problem), None)


def mixed_targets_problem() -> str | None:
    """Why the given variables point the commands at half a deployment, or None.

    The ledger and the queue must be the same deployment's: detect claims
    items in the database for messages it sends to the queue, and the worker
    saves each message's items where they were planned. A real database with
    a local queue would hold real items claimed for messages no real worker
    will see; a real queue with the embedded database would have the worker
    dead-letter every real message as never planned.
    """
    given = given_targets()
    database = [name for name in given if name in DATABASE_VARIABLES]
    queues = [name for name in given if name in QUEUE_VARIABLES]
    if bool(database) == bool(queues):
        return None
    if database:
        return (
            f"{', '.join(database)} is set but no queues are (RETRY_QUEUE_URL and RETRY_DLQ_URL, "
            "or AWS_ENDPOINT_URL): the command would claim that database's items for messages "
            "sent to a local queue. Give the database's own queues too, or neither."
        )
    return (
        f"{', '.join(queues)} is set but no database is (DATABASE_URL, or DB_AUTH and DB_*): "
        "the command would run those queues' messages against the embedded PostgreSQL, "
        "which never planned them. Give the queues' own database too, or neither."
    )


def check_targets(*, database: bool, aws: bool) -> None:
    """Refuse, before anything starts, variables that name a database or queues
    in part, or a database and queues of two different deployments.

    Raises:
        IncompleteTargetsError, MixedTargetsError: one line saying what is
            missing and what to do.
    """
    if problem := incomplete_targets_problem(database=database, aws=aws):
        raise IncompleteTargetsError(problem)
    if database and aws and (problem := mixed_targets_problem()):
        raise MixedTargetsError(problem)


def _set(**values: str) -> None:
    os.environ.update(values)
    get_settings.cache_clear()


@contextmanager
def local_environment(
    *,
    aws: str = "background",
    database: bool = True,
    state_dir: Path = LOCAL_STATE_DIR,
    llm_latency: float | None = None,
    keep_database: bool = False,
) -> Iterator[LocalEnvironment]:
    """Make a database (unless ``database=False``) and SQS (unless ``aws="none"``)
    reachable for this process.

    The embedded PostgreSQL is used only when no database variable is set, and
    moto only when no queue variable is: a database or queues given in part
    are refused (see :func:`check_targets`), never completed with local ones.

    Args:
        aws: ``"thread"`` runs moto in this process and stops it on exit;
            ``"background"`` shares one moto server between commands;
            ``"none"`` needs no AWS.
        database: False for a command that only moves queue messages.
        llm_latency: when given, the generate function calls Bedrock
            (``CONTENT_GENERATOR=bedrock``), served by a local Bedrock in this
            process that takes this many seconds a call.
        keep_database: leave the embedded PostgreSQL running when the process
            ends (``content-retry stop`` stops it).

    Raises:
        TargetsError: a database or queues given in part, or a command needing
            both given one of them only (checked before anything starts).
    """
    check_targets(database=database, aws=aws != "none")
    from content_retry.aws import bedrock_runtime_client, client
    from content_retry.database import get_engine
    from content_retry.generators import get_generator

    described = LocalEnvironment(database="given" if database else "none", aws="given")
    if database and not given_targets_of(DATABASE_VARIABLES):
        described.database = "embedded"
        described.data_dir = _start_embedded_database(state_dir, keep=keep_database)
    server: Any = None
    if aws == "none":
        described.aws = "none"
    elif not given_targets_of(QUEUE_VARIABLES):
        described.aws, server = _start_local_sqs(aws, state_dir)
    bedrock: Any = None
    if llm_latency is not None:
        from content_retry_local.bedrock_server import LocalBedrock

        bedrock = LocalBedrock(latency=llm_latency).start()
        _set(CONTENT_GENERATOR="bedrock", BEDROCK_MODEL_ID=LOCAL_MODEL_ID, **bedrock.environ())
    described.llm = (
        f"local Bedrock ({llm_latency:g} s a call)"
        if llm_latency is not None
        else describe_generator()
    )
    try:
        yield described
    finally:
        if get_engine.cache_info().currsize:
            get_engine().dispose()
        get_engine.cache_clear()
        client.cache_clear()
        bedrock_runtime_client.cache_clear()
        get_generator.cache_clear()
        if server is not None:
            server.stop()
        if bedrock is not None:
            bedrock.stop()


def given_targets_of(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that are set."""
    given = given_variables()
    return [name for name in names if name in given]


def _start_embedded_database(state_dir: Path, *, keep: bool) -> Path:
    """The embedded PostgreSQL on ``state_dir/pgdata``, its schema current."""
    from content_retry.database import get_engine
    from content_retry_local.postgres import start_embedded_postgres
    from content_retry_local.schema import upgrade

    data_dir = state_dir / "pgdata"
    _set(DATABASE_URL=start_embedded_postgres(data_dir, keep_running=keep))
    # Its own database is kept current; a given one is upgraded only by
    # `content-retry db upgrade`, which its operator runs on purpose.
    upgrade(get_engine())
    return data_dir


def _start_local_sqs(aws: str, state_dir: Path) -> tuple[str, Any]:
    """moto's server with the template's queues; (its description, a server to stop or None)."""
    from content_retry.aws import client
    from content_retry_local.aws import ensure_background_moto, start_threaded_moto
    from content_retry_local.template import create_queues

    server: Any = None
    if aws == "thread":
        endpoint, server = start_threaded_moto()
        described = "moto (this process)"
    else:
        endpoint = ensure_background_moto(state_dir)
        described = "moto (background)"
    # moto accepts any credentials; these never leave this machine.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    _set(AWS_ENDPOINT_URL=endpoint, AWS_REGION=get_settings().aws_region)
    client.cache_clear()
    queue_url, dlq_url = create_queues(client("sqs"))
    _set(RETRY_QUEUE_URL=queue_url, RETRY_DLQ_URL=dlq_url)
    return described, server
