"""Supplies the environment the handlers expect, when it is not given.

- No ``DATABASE_URL`` (and no ``DB_AUTH``): an embedded PostgreSQL, data under
  ``.local/pgdata``, reused between runs; its schema is upgraded on every start.
- No ``AWS_ENDPOINT_URL`` and no ``RETRY_QUEUE_URL``: moto's server on
  127.0.0.1, with the queues created as template.yaml defines them.

Given a real ``DATABASE_URL`` and real AWS (queue URLs and credentials), the
same commands use those instead. Handlers then run unchanged: they read the
same variables as in Lambda.
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
    llm: str = "as configured"  # or the local Bedrock this process started

    @property
    def all_its_own(self) -> bool:
        """Whether the database and the queues are ones this process started or
        created (the embedded PostgreSQL, moto in this process)."""
        return self.database == "embedded" and self.aws == "moto (this process)"


def given_targets() -> list[str]:
    """The variables that point the local commands at a database or AWS they did
    not start (empty when the embedded PostgreSQL and moto would be used)."""
    settings = get_settings()
    given = {
        "DATABASE_URL": settings.database_url,
        "DB_AUTH": settings.db_auth,
        "AWS_ENDPOINT_URL": settings.aws_endpoint_url,
        "RETRY_QUEUE_URL": settings.retry_queue_url,
        "RETRY_DLQ_URL": settings.retry_dlq_url,
    }
    return [name for name, value in given.items() if value]


class MixedTargetsError(ValueError):
    """A database and queues from two different worlds: one given, one local."""


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
    database = [name for name in ("DATABASE_URL", "DB_AUTH") if name in given]
    queues = [name for name in given if name not in database]
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
) -> Iterator[LocalEnvironment]:
    """Make a database (unless ``database=False``) and SQS (unless ``aws="none"``)
    reachable for this process.

    Args:
        aws: ``"thread"`` runs moto in this process and stops it on exit;
            ``"background"`` shares one moto server between commands;
            ``"none"`` needs no AWS.
        database: False for a command that only moves queue messages.
        llm_latency: when given, the generate function calls Bedrock
            (``CONTENT_GENERATOR=bedrock``), served by a local Bedrock in this
            process that takes this many seconds a call.

    Raises:
        MixedTargetsError: a command needing both was given one of them only
            (checked before anything starts).
    """
    if database and aws != "none" and (problem := mixed_targets_problem()):
        raise MixedTargetsError(problem)
    from content_retry.aws import bedrock_runtime_client, client
    from content_retry.database import get_engine
    from content_retry.generators import get_generator
    from content_retry_local.postgres import start_embedded_postgres
    from content_retry_local.schema import upgrade

    settings = get_settings()
    described = LocalEnvironment(database="given" if database else "none", aws="given")
    if database and not settings.database_url and not settings.db_auth:
        _set(DATABASE_URL=start_embedded_postgres(state_dir / "pgdata"))
        described.database = "embedded"
        # Its own database is kept current; a given one is upgraded only by
        # `content-retry db upgrade`, which its operator runs on purpose.
        upgrade(get_engine())

    server: Any = None
    if aws == "none":
        described.aws = "none"
    elif not settings.aws_endpoint_url and not settings.retry_queue_url:
        from content_retry_local.aws import ensure_background_moto, start_threaded_moto

        if aws == "thread":
            endpoint, server = start_threaded_moto()
            described.aws = "moto (this process)"
        else:
            endpoint = ensure_background_moto(state_dir)
            described.aws = "moto (background)"
        # moto accepts any credentials; these never leave this machine.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        _set(AWS_ENDPOINT_URL=endpoint, AWS_REGION=settings.aws_region)
        client.cache_clear()
        from content_retry_local.template import create_queues

        queue_url, dlq_url = create_queues(client("sqs"))
        _set(RETRY_QUEUE_URL=queue_url, RETRY_DLQ_URL=dlq_url)
    bedrock: Any = None
    if llm_latency is not None:
        from content_retry_local.bedrock_server import LocalBedrock

        bedrock = LocalBedrock(latency=llm_latency).start()
        described.llm = f"local Bedrock ({llm_latency:g} s a call)"
        _set(CONTENT_GENERATOR="bedrock", BEDROCK_MODEL_ID=LOCAL_MODEL_ID, **bedrock.environ())
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
