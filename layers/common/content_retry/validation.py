"""Errors as text a person can act on: pydantic's validation errors (where, and
what), and any error clipped to a length that can be stored and sent."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def describe_errors(
    errors: Iterable[Mapping[str, Any]],
    *,
    whole: str,
    skip: tuple[str, ...] = (),
    limit: int = 10,
) -> list[str]:
    """One ``location: message`` line per error (at most ``limit``).

    Args:
        errors: ``ValidationError.errors()`` (or Powertools' equivalent).
        whole: the name of the whole input, for errors about it as a whole.
        skip: location parts that only say where the input came from ("body").
    """
    lines = []
    for error in list(errors)[:limit]:
        location = ".".join(str(part) for part in error.get("loc", ()) if part not in skip)
        lines.append(f"{location or whole}: {error.get('msg', 'invalid')}")
    return lines


# Longest error text kept on a ledger item or sent in a message attribute; the
# full error goes to the logs.
ERROR_TEXT_LIMIT = 2_000


def clip_error(error: str) -> str:
    """``error``, cut to :data:`ERROR_TEXT_LIMIT` characters."""
    return error if len(error) <= ERROR_TEXT_LIMIT else error[: ERROR_TEXT_LIMIT - 1] + "…"
