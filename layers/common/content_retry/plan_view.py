"""The retry plan before paying for it (``GET /roadmaps/{id}/retry-plan``,
``content-retry plan``): the retry's own judge, nothing written, with an estimate."""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, Field

from content_retry.content_types import ContentType
from content_retry.estimates import estimate, tokens_per_call
from content_retry.plan.build import build_retry_plan
from content_retry.plan.models import Reason
from content_retry.retries import DetectDependencies


class PlanItem(BaseModel):
    concept_id: str
    content_type: ContentType
    reason: Reason


class HeldPlanItem(BaseModel):
    concept_id: str
    content_type: ContentType
    waiting_for_redrive: bool = Field(
        description="Its generated content waits in the dead-letter queue (saved by the next "
        "re-drive, unpaid); otherwise another task's live claim holds it"
    )


class PlanEstimate(BaseModel):
    llm_calls: int = Field(description="One call per item")
    input_tokens: int
    output_tokens: int
    cost_usd: float = Field(
        description="At LLM_PRICE_INPUT_USD_PER_MTOK / LLM_PRICE_OUTPUT_USD_PER_MTOK, from the "
        "tokens the ledger recorded per content type (a documented default before any)"
    )


class RetryPlanView(BaseModel):
    roadmap_id: str
    retry_count: int = Field(description="Items a retry would plan now")
    items: list[PlanItem]
    held: list[HeldPlanItem] = Field(
        description="Items that need content but a live claim or a re-drive holds"
    )
    estimate: PlanEstimate


def preview_retry(
    deps: DetectDependencies,
    roadmap_id: str,
    *,
    content_types: list[str] | None = None,
    owner: str | None = None,
) -> RetryPlanView:
    """What a retry of the roadmap would plan now and cost; nothing is written.

    Raises:
        UnknownContentTypeError: a content type is unknown, or the list is empty.
        RoadmapNotFoundError: no such roadmap, or it is not ``owner``'s.
    """
    settings = deps.settings
    with deps.engine.begin() as connection:
        plan = build_retry_plan(
            connection,
            roadmap_id,
            content_types,
            owner=owner,
            claim_lease_minutes=settings.claim_lease_minutes,
            queue_retention_minutes=settings.queue_retention_minutes,
            preview=True,
        )
        per_call = tokens_per_call(connection, plan.content_types)
    counts = Counter(item.content_type for _, item in plan.items)
    cost = estimate(
        counts,
        per_call,
        input_usd_per_mtok=settings.llm_price_input_usd_per_mtok,
        output_usd_per_mtok=settings.llm_price_output_usd_per_mtok,
    )
    return RetryPlanView(
        roadmap_id=roadmap_id,
        retry_count=plan.item_count,
        items=[
            PlanItem(concept_id=c.concept_id, content_type=i.content_type, reason=i.reason)
            for c, i in plan.items
        ],
        held=[
            HeldPlanItem(
                concept_id=h.concept_id,
                content_type=h.content_type,
                waiting_for_redrive=h.waiting_for_redrive,
            )
            for h in plan.held
        ],
        estimate=PlanEstimate(
            llm_calls=cost.llm_calls,
            input_tokens=cost.input_tokens,
            output_tokens=cost.output_tokens,
            cost_usd=cost.cost_usd,
        ),
    )
