"""What every benchmark shares: results, timing, counting, PostgreSQL, quiet logs.

Timing is always relative: :func:`alternate` runs the subject and its baseline
in alternation (the order rotated every round) and keeps the median of each,
so a burst of load from a neighbour on the shared machine hits both alike and
one slow round moves neither figure.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parent.parent


# --- results -------------------------------------------------------------------------------


@dataclass
class Result:
    """One benchmark's outcome, as the final table shows it.

    ``met`` is None when the benchmark could not run (it says why in
    ``measured``); ``crashed`` when it raised.
    """

    id: str
    what: str
    goal: str
    measured: str
    met: bool | None
    crashed: bool = False

    @property
    def verdict(self) -> str:
        if self.crashed:
            return "crashed"
        if self.met is None:
            return "skipped"
        return "met" if self.met else "MISSED"


def say(line: str = "") -> None:
    """Print one line of a benchmark's report, indented under its heading (to the
    process's real stdout, even where :func:`quiet_powertools` silences it)."""
    print(f"  {line}" if line else "", file=sys.__stdout__, flush=True)


def verdict_line(met: bool, goal: str) -> str:
    return f"goal {goal}: {'met' if met else 'MISSED'}"


# --- timing --------------------------------------------------------------------------------


def timed(function: Callable[[], object]) -> float:
    """Seconds one call takes (garbage collected before, so no earlier call's
    garbage is collected during it)."""
    gc.collect()
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def alternate(
    candidates: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
    setup: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each candidate, run in alternation.

    Every round runs each candidate once, in an order rotated by one each round,
    so neither the subject nor the baseline always runs first (after the other
    one warmed a cache, or right after a pause). ``warmup`` rounds are run
    first and discarded. ``setup[name]``, when given, runs untimed right before
    each call of that candidate.
    """
    names = list(candidates)
    setup = setup or {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(warmup + rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            if name in setup:
                setup[name]()
            seconds = timed(candidates[name])
            if round_number >= warmup:
                samples[name].append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1_000_000:.1f} µs"


# --- counting what reaches the database ------------------------------------------------------


class EngineCounter:
    """Counts what an engine sends to the server, from SQLAlchemy's events.

    ``statements`` are ``before_cursor_execute`` events (every SQL statement
    SQLAlchemy executes); ``begins``/``commits``/``rollbacks`` are the
    transaction events; ``checkouts`` are pool checkouts, each of which runs
    the engine's pre-ping (``SELECT 1`` through the raw DBAPI cursor, which no
    cursor event sees).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []
        self.begins = 0
        self.commits = 0
        self.rollbacks = 0
        self.checkouts = 0

    def _statement(self, conn: object, cursor: object, statement: str, *args: object) -> None:
        self.statements.append(statement)

    def _begin(self, conn: object) -> None:
        self.begins += 1

    def _commit(self, conn: object) -> None:
        self.commits += 1

    def _rollback(self, conn: object) -> None:
        self.rollbacks += 1

    def _checkout(self, *args: object) -> None:
        self.checkouts += 1

    def _listeners(self) -> list[tuple[Any, str, Callable[..., None]]]:
        return [
            (self.engine, "before_cursor_execute", self._statement),
            (self.engine, "begin", self._begin),
            (self.engine, "commit", self._commit),
            (self.engine, "rollback", self._rollback),
            (self.engine.pool, "checkout", self._checkout),
        ]

    def __enter__(self) -> EngineCounter:
        for target, name, listener in self._listeners():
            event.listen(target, name, listener)
        return self

    def __exit__(self, *exc: object) -> None:
        for target, name, listener in self._listeners():
            event.remove(target, name, listener)

    @property
    def round_trips(self) -> int:
        """Statements, BEGINs, COMMITs and checkout pings: the brief's round trips."""
        return len(self.statements) + self.begins + self.commits + self.checkouts


class WireCounter:
    """Counts pg8000's waits for the server: every network round trip, whatever sent it.

    pg8000 reads the server's answer in ``CoreConnection.handle_messages``
    once per exchange (its extended protocol takes three exchanges for one
    parameterised statement: parse, describe, bind/execute), so this counts
    what the engine events cannot see. It patches the class, so it counts
    every pg8000 connection of the process: use it single-threaded.
    """

    def __init__(self) -> None:
        self.exchanges = 0

    def __enter__(self) -> WireCounter:
        from pg8000.core import CoreConnection

        original = CoreConnection.handle_messages
        counter = self

        def counting(connection: Any, context: Any) -> Any:
            counter.exchanges += 1
            return original(connection, context)

        self._original = original
        CoreConnection.handle_messages = counting
        return self

    def __exit__(self, *exc: object) -> None:
        from pg8000.core import CoreConnection

        CoreConnection.handle_messages = self._original


# --- PostgreSQL ----------------------------------------------------------------------------


class Postgres:
    """The embedded PostgreSQL (pgserver wheel) in a temporary folder, one database
    per benchmark so no benchmark sees another's rows or statistics.

    The folder is removed when the process exits, after pgserver stopped the
    server (atexit handlers run last-registered first).
    """

    def __init__(self) -> None:
        from content_retry_local.postgres import start_embedded_postgres

        root = Path(tempfile.mkdtemp(prefix="content-retry-bench-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.url = start_embedded_postgres(root / "data", delete_on_exit=True)
        unix_sock = make_url(self.url).query["unix_sock"]
        assert isinstance(unix_sock, str)
        self.unix_sock = unix_sock
        self.socket_dir = str(Path(unix_sock).parent)
        self.port = int(unix_sock.rsplit(".", 1)[1])

    def connect(self, database: str = "postgres") -> Any:
        """A raw pg8000 DB-API connection (autocommit off), straight to the server."""
        import pg8000.dbapi

        return pg8000.dbapi.connect(user="postgres", database=database, unix_sock=self.unix_sock)

    def database_url(self, database: str) -> str:
        return make_url(self.url).set(database=database).render_as_string(hide_password=False)

    def create_database(self, database: str) -> str:
        """A new, empty database with the pipeline's schema; returns its URL."""
        from content_retry.database import build_engine
        from content_retry.settings import Settings
        from content_retry_local.schema import upgrade

        admin = self.connect()
        admin.autocommit = True
        try:
            cursor = admin.cursor()
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE "{database}"')
        finally:
            admin.close()
        url = self.database_url(database)
        engine = build_engine(Settings(DATABASE_URL=url))
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        return url


@dataclass
class BenchEnv:
    """What the benchmarks share: the PostgreSQL server, started on first use."""

    quick: bool
    _postgres: Postgres | None = field(default=None, init=False, repr=False)

    @property
    def postgres(self) -> Postgres:
        if self._postgres is None:
            self._postgres = Postgres()
        return self._postgres


def settings_for(url: str, **extra: str) -> Any:
    """The functions' Settings for a database URL (queue URLs as given)."""
    from content_retry.settings import Settings

    return Settings.from_environ({"DATABASE_URL": url, **extra})


def analyze(engine: Engine) -> None:
    """Refresh the planner's statistics after a bulk load, as autovacuum would."""
    from sqlalchemy import text

    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))


# --- quiet Powertools ------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_powertools() -> Iterator[None]:
    """Send the functions' logs and EMF metrics to /dev/null, still formatted.

    The JSON formatting of every log record and metric stays in the measured
    time (Lambda pays it too); only the writing to this terminal goes.
    """
    from content_retry.observability import logger

    handler: Any = logger.registered_handler
    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        previous = handler.setStream(sink)
        try:
            yield
        finally:
            if previous is not None:
                handler.setStream(previous)
