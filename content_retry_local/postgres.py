"""An embedded PostgreSQL from a pip wheel (pgserver): no system install, no Docker."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started."""


def start_embedded_postgres(
    data_dir: Path, *, delete_on_exit: bool = False, max_connections: int | None = None
) -> str:
    """Start (or reuse) a PostgreSQL server whose data lives in ``data_dir``.

    The server listens only on a Unix socket; it is stopped cleanly when the
    last process using it exits. A server already running on ``data_dir`` (from
    another process) is reused, and a stopped one keeps its data.

    Args:
        data_dir: the cluster's data folder; created (with its parent) if absent.
        delete_on_exit: remove the data when the server stops (tests).
        max_connections: set the server's connection limit (a restart, the
            first time): for tests of what happens when it is reached.

    Returns:
        A SQLAlchemy URL for the ``postgres`` database.

    Raises:
        EmbeddedPostgresError: the wheel is not installed or the server failed.
    """
    mode = "delete" if delete_on_exit else "stop"
    server = _get_server(data_dir, "stop" if max_connections else mode)
    if max_connections is not None:
        limit = int(max_connections)
        if f" {limit}\n" not in server.psql("SHOW max_connections;"):
            server.psql(f"ALTER SYSTEM SET max_connections = {limit};")
        server.cleanup()  # max_connections takes effect at the next start
        server = _get_server(data_dir, mode)
    info = server.get_postmaster_info()
    port = info.port or 5432
    return f"postgresql+pg8000://postgres@/postgres?unix_sock={info.socket_dir}/.s.PGSQL.{port}"


def _get_server(data_dir: Path, cleanup_mode: str) -> Any:
    try:
        from pgserver import get_server  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EmbeddedPostgresError(
            "the embedded PostgreSQL needs the 'pgserver' package "
            "(pip install 'content-retry[local]'), or set DATABASE_URL"
        ) from exc
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (as in containers)
            # and falls back to /tmp, which is what we want.
            warnings.simplefilter("ignore")
            return get_server(data_dir, cleanup_mode=cleanup_mode)
    except Exception as exc:
        raise EmbeddedPostgresError(
            f"embedded PostgreSQL did not start in {data_dir}: {exc}"
        ) from exc
