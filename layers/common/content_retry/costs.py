"""What the paid work cost: LLM calls and tokens, per item and summed."""

from __future__ import annotations

from dataclasses import dataclass

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
