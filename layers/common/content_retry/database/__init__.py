"""PostgreSQL: the engine (one lazily created connection per process) and the tables."""

from content_retry.database.engine import build_engine, get_engine
from content_retry.database.schema import create_missing

__all__ = ["build_engine", "create_missing", "get_engine"]
