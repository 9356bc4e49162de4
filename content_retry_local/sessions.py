"""The database sessions one engine opened, and a way to end them.

Stages a lost connection; only the sessions this process opened are ever ended.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.pool import NullPool


class EngineSessions:
    """Records the backend pid of every connection ``engine`` opens from now on.

    Use as a context manager (or call :meth:`close`) to stop recording.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.pids: set[int] = set()
        event.listen(engine, "connect", self._record)
        # Connections opened before the listener are closed, so every session
        # the engine uses from here on is one that is recorded.
        engine.dispose()

    def _record(self, dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT pg_backend_pid()")
            self.pids.add(int(cursor.fetchone()[0]))
        finally:
            cursor.close()

    def terminate(self) -> int:
        """End every recorded session still open; returns how many were ended."""
        if not self.pids:
            return 0
        killer = create_engine(self._engine.url, poolclass=NullPool)
        try:
            with killer.begin() as connection:
                ended = connection.execute(
                    text(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                        "FROM pg_stat_activity WHERE pid = ANY(:pids)"
                    ),
                    {"pids": sorted(self.pids)},
                ).scalar_one()
        finally:
            killer.dispose()
        return int(ended)

    def close(self) -> None:
        event.remove(self._engine, "connect", self._record)

    def __enter__(self) -> EngineSessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
