"""``EXPLAIN`` of a SQLAlchemy Core statement, its parameters bound as when executed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import ClauseElement, Connection, Executable
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler


class Explain(Executable, ClauseElement):
    inherit_cache = False

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _explain(element: Explain, compiler: SQLCompiler, **kw: Any) -> str:
    return "EXPLAIN " + compiler.process(element.statement, **kw)


def explain(connection: Connection, statement: ClauseElement, params: Mapping[str, Any]) -> str:
    """PostgreSQL's plan for ``statement`` with ``params``, one line per plan node."""
    return "\n".join(connection.execute(Explain(statement), dict(params)).scalars())
