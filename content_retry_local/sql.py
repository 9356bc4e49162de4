"""``content-retry sql``: look inside the local database (or the given one)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url


def run_statement(engine: Engine, statement: str) -> list[str]:
    """Run one statement in its own transaction (committed); its rows as psql prints them."""
    with engine.begin() as connection:
        result = connection.execute(text(statement))
        if not result.returns_rows:
            count = result.rowcount
            return [f"({count} row{'' if count == 1 else 's'} changed)"] if count >= 0 else ["OK"]
        columns = list(result.keys())
        rows = [tuple(row) for row in result.all()]
    return format_table(columns, rows)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Rows aligned under their column names, numbers to the right, then a count."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [
        max([len(name), *(len(row[index]) for row in cells)]) for index, name in enumerate(columns)
    ]
    numeric = [
        bool(rows) and all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(columns))
    ]

    def line(values: Sequence[str], right: Sequence[bool]) -> str:
        return " " + " | ".join(
            value.rjust(width) if align else value.ljust(width)
            for value, width, align in zip(values, widths, right, strict=True)
        )

    lines = [
        line([name.center(width) for name, width in zip(columns, widths, strict=True)], numeric),
        "-" + "-+-".join("-" * width for width in widths) + "-",
    ]
    lines += [line(row, numeric).rstrip() for row in cells]
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return lines


def libpq_url(database_url: str) -> str:
    """The URL ``psql`` takes for a SQLAlchemy one (pg8000's ``unix_sock`` as ``host``)."""
    url = make_url(database_url).set(drivername="postgresql")
    socket_path = url.query.get("unix_sock")
    if isinstance(socket_path, str):
        folder, _, name = socket_path.rpartition("/")
        port = name.rsplit(".", 1)[-1]
        url = url.difference_update_query(["unix_sock"]).update_query_dict(
            {"host": folder, "port": port}
        )
    return url.render_as_string(hide_password=False)


def psql() -> Path:
    """The pgserver wheel's psql (the server's own version), else one on PATH.

    Raises:
        FileNotFoundError: neither exists.
    """
    from content_retry_local.postgres import psql_executable

    wheel = psql_executable()
    if wheel.exists():
        return wheel
    found = shutil.which("psql")
    if found is None:
        raise FileNotFoundError("no psql: give a statement to run instead")
    return Path(found)


def open_psql(database_url: str) -> int:
    """An interactive psql on the database; returns its exit status.

    Ctrl-C belongs to psql meanwhile (it cancels a query there): this process
    catches SIGINT and does nothing, and psql, started afresh, has its own.
    """
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        command = [str(psql()), libpq_url(database_url)]
        return subprocess.run(command, check=False).returncode  # noqa: S603 - the wheel's psql
    finally:
        signal.signal(signal.SIGINT, previous)
