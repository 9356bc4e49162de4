"""What the paid work cost: LLM calls and tokens, per item and summed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from content_retry.content_types import ContentType
from content_retry.generators.base import Usage


@dataclass(frozen=True)
class ItemCost:
    """What generating one item cost: its calls, their tokens, their throttled attempts."""

    llm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    throttled_attempts: int = 0

    @classmethod
    def of_call(cls, usage: Usage) -> ItemCost:
        """One call's cost, from what the generator reported."""
        return cls(1, usage.input_tokens, usage.output_tokens, usage.throttled_attempts)

    def __add__(self, other: ItemCost) -> ItemCost:
        return ItemCost(
            self.llm_calls + other.llm_calls,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.throttled_attempts + other.throttled_attempts,
        )


NOT_CALLED = ItemCost()


def costs_to_text(costs: Mapping[ContentType, ItemCost]) -> str | None:
    """What a message's items cost, as the text a dead-letter copy carries."""
    paid = {
        ct.value: [c.llm_calls, c.input_tokens, c.output_tokens]
        for ct, c in costs.items()
        if c.llm_calls
    }
    return json.dumps(paid, separators=(",", ":")) if paid else None


def costs_from_text(text: str | None) -> dict[ContentType, ItemCost]:
    """The costs a dead-letter copy carries; nothing when absent or unreadable
    (the ledger then misses them, the metrics do not)."""
    try:
        data = json.loads(text or "{}")
        return {
            ContentType(name): ItemCost(int(calls), int(tokens_in), int(tokens_out))
            for name, (calls, tokens_in, tokens_out) in data.items()
        }
    except (ValueError, TypeError, AttributeError):
        return {}
