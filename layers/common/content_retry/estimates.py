"""What a retry plan would cost, before anything is paid (the retry-plan endpoint).

Tokens per LLM call are what the ledger recorded for each content type's
recent paid calls; before any, a documented default. Prices are configured
(``LLM_PRICE_INPUT_USD_PER_MTOK``, ``LLM_PRICE_OUTPUT_USD_PER_MTOK``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, text

from content_retry.content_types import ContentType

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

_RECORDED_TOKENS = text(
    "SELECT w.content_type, sum(r.llm_calls) AS calls, sum(r.input_tokens) AS input_tokens, "
    "sum(r.output_tokens) AS output_tokens "
    "FROM unnest(CAST(:content_types AS text[])) AS w(content_type) "
    "CROSS JOIN LATERAL (SELECT llm_calls, input_tokens, output_tokens FROM retry_items "
    "  WHERE content_type = w.content_type AND llm_calls > 0 "
    "  ORDER BY updated_at DESC LIMIT :recent) AS r "
    "GROUP BY w.content_type"
)


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
    rows = connection.execute(
        _RECORDED_TOKENS,
        {"content_types": [ct.value for ct in content_types], "recent": RECENT_CALLS},
    )
    for row in rows:
        if row.calls:
            averages[ContentType(row.content_type)] = (
                row.input_tokens / row.calls,
                row.output_tokens / row.calls,
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
