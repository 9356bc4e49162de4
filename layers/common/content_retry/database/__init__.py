"""PostgreSQL: the engine (one lazily created connection per process) and its failures."""

from content_retry.database.engine import (
    DATABASE_ERRORS,
    BatchConnection,
    DatabaseUnavailableError,
    build_engine,
    get_engine,
    refused_data,
)

__all__ = [
    "DATABASE_ERRORS",
    "BatchConnection",
    "DatabaseUnavailableError",
    "build_engine",
    "get_engine",
    "refused_data",
]
