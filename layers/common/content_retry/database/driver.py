"""What this project changes in pg8000's behaviour, and why.

pg8000 turns a statement's ``%s`` placeholders into PostgreSQL's ``$1`` on
every execution, scanning the text in Python character by character. For
the worker's save statement (about 2,200 characters) that is about 1 ms per
item saved, an eighth of the item's whole cost in benchmark B3. In the
``format`` style SQLAlchemy uses, the converted text depends on the text
alone and the parameters pass through unchanged, so the conversion is
remembered per statement text. The runtime issues a few dozen distinct texts
(all built from constants), so the cache stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

# Distinct statement texts remembered; the runtime has a few dozen.
_REMEMBERED_STATEMENTS = 256

Conversion = Callable[[str, str, Any], tuple[str, Any]]


def remember_statement_conversions() -> None:
    """Make pg8000 convert each statement text's placeholders once per process.

    Idempotent. Leaves pg8000 as it is when it has no such step (a version
    whose internals moved): slower, never wrong.
    """
    try:
        import pg8000.legacy as legacy
    except ImportError:  # pragma: no cover - pg8000 is a runtime dependency
        return
    convert = getattr(legacy, "convert_paramstyle", None)
    if convert is None or getattr(convert, "remembered", False):
        return
    legacy.convert_paramstyle = remembering(convert)


def remembering(convert: Conversion) -> Conversion:
    """``convert`` (pg8000's ``convert_paramstyle``) with ``format``-style texts remembered."""

    @lru_cache(maxsize=_REMEMBERED_STATEMENTS)
    def converted_text(query: str) -> str:
        # In the format style the parameters are returned as given: the text
        # is the only output that needs the scan.
        text, _ = convert("format", query, ())
        return text

    def convert_paramstyle(style: str, query: str, args: Any) -> tuple[str, Any]:
        if style != "format":
            return convert(style, query, args)
        return converted_text(query), args

    convert_paramstyle.remembered = True  # type: ignore[attr-defined]
    convert_paramstyle.cache_info = converted_text.cache_info  # type: ignore[attr-defined]
    return convert_paramstyle
