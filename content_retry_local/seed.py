"""The seed's scenario: the roadmap whose 21 lost tutorials the old retry missed.

Used by ``content-retry demo`` and by the tests, so both show the same failure.
Rows are written naming only the contract's columns, as the platform writes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, func, insert, null

from content_retry.content_types import STORAGE, ContentType, PayloadFormat
from content_retry.tables import content_tables, payload_column, roadmap_metadata

SEED_ROADMAP_ID = "agent-performance-optimization-x5y9z2q8"
SEED_USER_ID = "u-42"

_SEED_CURRICULUM: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...] = (
    (
        "Measuring agent performance",
        (
            (
                "Latency and throughput",
                (
                    "End-to-end latency budgets",
                    "Time to first token",
                    "Tokens per second under load",
                    "Tail latency (p95, p99)",
                    "Tracing an agent step by step",
                ),
            ),
            (
                "Cost and quality metrics",
                (
                    "Cost per task",
                    "Token accounting",
                    "Task success rate",
                    "Evaluation datasets for agents",
                    "Regression testing prompts",
                ),
            ),
        ),
    ),
    (
        "Optimising the model calls",
        (
            (
                "Prompt efficiency",
                (
                    "Prompt compression",
                    "Few-shot example selection",
                    "Structured output formats",
                    "System prompt caching",
                    "Context window management",
                ),
            ),
            (
                "Serving strategies",
                (
                    "Model routing by difficulty",
                    "Speculative decoding",
                    "Batching requests",
                    "Streaming responses",
                    "Quantised models",
                    "Response caching",
                ),
            ),
        ),
    ),
    (
        "Optimising the agent loop",
        (
            (
                "Planning and tools",
                (
                    "Parallel tool calls",
                    "Reducing reasoning steps",
                    "Tool result summarisation",
                    "Early stopping criteria",
                    "Plan caching",
                ),
            ),
            (
                "Memory and state",
                (
                    "Short-term memory windows",
                    "Vector memory retrieval cost",
                    "State checkpointing",
                    "Idempotent tool execution",
                    "Backpressure and rate limits",
                ),
            ),
        ),
    ),
)


@dataclass
class ConceptSeed:
    concept_id: str
    name: str
    description: str
    statuses: Mapping[str, str | None] = field(default_factory=dict)


def build_framework(
    stages: Sequence[tuple[str, Sequence[tuple[str, Sequence[ConceptSeed]]]]],
) -> dict[str, Any]:
    """``framework_data`` in the platform's shape from (stage, [(module, [concepts])])."""
    return {
        "stages": [
            {
                "stage_id": f"s{stage_number}",
                "name": stage_name,
                "modules": [
                    {
                        "module_id": f"s{stage_number}m{module_number}",
                        "name": module_name,
                        "concepts": [
                            {
                                "concept_id": concept.concept_id,
                                "name": concept.name,
                                "description": concept.description,
                                "content_status": concept.statuses.get("content_status"),
                                "resources_status": concept.statuses.get("resources_status"),
                                "quiz_status": concept.statuses.get("quiz_status"),
                            }
                            for concept in concepts
                        ],
                    }
                    for module_number, (module_name, concepts) in enumerate(modules, start=1)
                ],
            }
            for stage_number, (stage_name, modules) in enumerate(stages, start=1)
        ]
    }


def single_module_framework(concepts: Iterable[ConceptSeed]) -> dict[str, Any]:
    """A roadmap of one stage and one module holding ``concepts``."""
    return build_framework([("Stage one", [("Module one", list(concepts))])])


def insert_roadmap(
    connection: Connection,
    roadmap_id: str,
    user_id: str,
    framework_data: dict[str, Any],
    *,
    title: str | None = None,
    age_minutes: int = 0,
) -> None:
    """Insert a roadmap row; ``age_minutes`` backdates created_at/updated_at."""
    written_at = func.now() - timedelta(minutes=age_minutes)
    connection.execute(
        insert(roadmap_metadata).values(
            roadmap_id=roadmap_id,
            user_id=user_id,
            title=title,
            framework_data=framework_data,
            created_at=written_at,
            updated_at=written_at,
        )
    )


def insert_content_row(
    connection: Connection,
    content_type: ContentType,
    roadmap_id: str,
    concept_id: str,
    status: str,
    *,
    version: int = 1,
    is_latest: bool = True,
) -> None:
    """Insert one content row as the platform would (content filled when completed)."""
    payload: object = (
        []
        if STORAGE[content_type].payload_format is PayloadFormat.JSON
        else f"# {concept_id}\n\nSaved by the platform."
    )
    connection.execute(
        insert(content_tables[content_type]).values(
            {
                "roadmap_id": roadmap_id,
                "concept_id": concept_id,
                "title": concept_id,
                # SQL NULL until completed (not a JSON null).
                payload_column(content_type): payload if status == "completed" else null(),
                "content_status": status,
                "content_version": version,
                "is_latest": is_latest,
            }
        )
    )


@dataclass(frozen=True)
class SeedScenario:
    roadmap_id: str
    user_id: str
    completed_tutorials: tuple[str, ...]
    lost_tutorials: tuple[str, ...]
    failed_quizzes: tuple[str, ...]
    failed_resources: tuple[str, ...]


def seed_scenario(connection: Connection, *, other_failures: bool = False) -> SeedScenario:
    """Insert the seed's roadmap: 31 concepts, 10 tutorials completed, 21 lost.

    The 21 lost tutorials were generated but never saved (the pool was
    exhausted): no tutorial row exists and their ``content_status`` is still
    ``null`` or ``processing``; none says ``failed``. Resource lists and quizzes
    are completed for every concept, except, with ``other_failures``, three
    quizzes and two resource lists whose generation failed (a failed row and a
    ``failed`` status), as on the real platform.
    """
    concepts: list[ConceptSeed] = []
    stages: list[tuple[str, list[tuple[str, list[ConceptSeed]]]]] = []
    number = 0
    for stage_name, modules in _SEED_CURRICULUM:
        stage_modules: list[tuple[str, list[ConceptSeed]]] = []
        for module_name, names in modules:
            module_concepts = []
            for name in names:
                number += 1
                concept = ConceptSeed(
                    concept_id=f"c{number:02d}",
                    name=name,
                    description=f"{name}: what it is, how to measure it, and how it speeds "
                    f"up an AI agent in production ({module_name.lower()}).",
                )
                module_concepts.append(concept)
                concepts.append(concept)
            stage_modules.append((module_name, module_concepts))
        stages.append((stage_name, stage_modules))

    completed = tuple(concept.concept_id for concept in concepts[:10])
    lost = tuple(concept.concept_id for concept in concepts[10:])
    failed_quizzes = ("c03", "c14", "c27") if other_failures else ()
    failed_resources = ("c08", "c19") if other_failures else ()
    for index, concept in enumerate(concepts):
        lost_tutorial = concept.concept_id in lost
        concept.statuses = {
            # The worker set "processing" before generating; some never got that far.
            "content_status": ("processing" if index % 2 else None)
            if lost_tutorial
            else "completed",
            "resources_status": "failed" if concept.concept_id in failed_resources else "completed",
            "quiz_status": "failed" if concept.concept_id in failed_quizzes else "completed",
        }

    insert_roadmap(
        connection,
        SEED_ROADMAP_ID,
        SEED_USER_ID,
        build_framework(stages),
        title="Agent performance optimisation",
        age_minutes=24 * 60,
    )
    for concept in concepts:
        if concept.concept_id in completed:
            insert_content_row(
                connection, ContentType.TUTORIAL, SEED_ROADMAP_ID, concept.concept_id, "completed"
            )
        for content_type, failed in (
            (ContentType.RESOURCES, failed_resources),
            (ContentType.QUIZ, failed_quizzes),
        ):
            status = "failed" if concept.concept_id in failed else "completed"
            insert_content_row(
                connection, content_type, SEED_ROADMAP_ID, concept.concept_id, status
            )
    return SeedScenario(
        roadmap_id=SEED_ROADMAP_ID,
        user_id=SEED_USER_ID,
        completed_tutorials=completed,
        lost_tutorials=lost,
        failed_quizzes=failed_quizzes,
        failed_resources=failed_resources,
    )


def old_status_only_rule(framework_data: dict[str, Any], status_key: str) -> list[str]:
    """The old worker's rule, kept to show what it missed: status == "failed" only.

    Never used to decide anything; the demo and a test print its answer (0 for
    the seed's tutorials) beside the judge's (21).
    """
    return [
        concept.get("concept_id")
        for stage in framework_data.get("stages", [])
        for module in stage.get("modules", [])
        for concept in module.get("concepts", [])
        if concept.get(status_key) == "failed"
    ]
