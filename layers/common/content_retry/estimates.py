"""What a retry plan would cost, before anything is paid (the retry-plan endpoint).

Tokens per LLM call are what the ledger recorded for each content type's
recent paid calls; before any, a documented default. Prices are configured
(``LLM_PRICE_INPUT_USD_PER_MTOK``, ``LLM_PRICE_OUTPUT_USD_PER_MTOK``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection

from content_retry.content_types import ContentType
from content_retry.repositories.claims import recent_paid_calls

# Tokens (input, output) of one call until the ledger has recorded paid calls of
# that type: a concept's prompt with the content's schema, and an answer of the
# length the content models allow in practice.
DEFAULT_TOKENS_PER_CALL: dict[ContentType, tuple[float, float]] = {
    ContentType.TUTORIAL: (900.0, 2_500.0),
    ContentType.RESOURCES: (800.0, 1_200.0),
    ContentType.QUIZ: (800.0, 1_800.0),
}
# The recent paid calls of a content type the averages are taken over.
RECENT_CALLS = 500


@dataclass(frozen=True)
class Estimate:
    """LLM calls, tokens and dollars a plan would cost, one call per item."""

    llm_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


def tokens_per_call(
    connection: Connection, content_types: tuple[ContentType, ...]
) -> dict[ContentType, tuple[float, float]]:
    """Average (input, output) tokens of one call per content type: the ledger's
    recent paid calls, or the default where it has none."""
    averages = dict(DEFAULT_TOKENS_PER_CALL)
    for content_type, paid in recent_paid_calls(connection, content_types, RECENT_CALLS).items():
        averages[content_type] = (
            paid.input_tokens / paid.llm_calls,
            paid.output_tokens / paid.llm_calls,
        )
    return averages


def estimate(
    items: Mapping[ContentType, int],
    per_call: Mapping[ContentType, tuple[float, float]],
    *,
    input_usd_per_mtok: float,
    output_usd_per_mtok: float,
) -> Estimate:
    """The cost of ``items`` (count per content type), one call each."""
    calls = sum(items.values())
    input_tokens = round(sum(n * per_call[ct][0] for ct, n in items.items()))
    output_tokens = round(sum(n * per_call[ct][1] for ct, n in items.items()))
    cost = (input_tokens * input_usd_per_mtok + output_tokens * output_usd_per_mtok) / 1_000_000
    return Estimate(calls, input_tokens, output_tokens, round(cost, 4))
