"""Bulk builders of benchmark data, in the platform's shapes.

Roadmaps are built with the seed's own ``build_framework`` (so they have the
platform's ``framework_data`` shape); content rows and claims go in with one
statement per table (arrays unnested server-side), so a 10,000-concept
roadmap loads in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from content_retry.content_types import STORAGE, ContentType
from content_retry_local.seed import ConceptSeed, build_framework, insert_roadmap

USER_ID = "u-bench"
CONCEPTS_PER_MODULE = 10
MODULES_PER_STAGE = 10

# The framework status of each content type, as a concept's statuses dict keys it.
StatusFor = Callable[[int], dict[ContentType, str | None]]


def concept_seeds(count: int, statuses: StatusFor) -> list[ConceptSeed]:
    """``count`` concepts ``c00000``..., each with a name, a description and the
    framework statuses ``statuses(index)`` gives."""
    return [
        ConceptSeed(
            concept_id=f"c{index:05d}",
            name=f"Concept {index}",
            description=f"Concept {index}: what it is, why it matters and how to measure it.",
            statuses={
                STORAGE[content_type].status_key: status
                for content_type, status in statuses(index).items()
            },
        )
        for index in range(count)
    ]


def framework_of(concepts: Sequence[ConceptSeed]) -> dict[str, Any]:
    """``framework_data`` holding the concepts, 10 per module and 10 modules per stage."""
    modules = [
        (
            f"Module {start // CONCEPTS_PER_MODULE + 1}",
            list(concepts[start : start + CONCEPTS_PER_MODULE]),
        )
        for start in range(0, len(concepts), CONCEPTS_PER_MODULE)
    ]
    stages = [
        (f"Stage {start // MODULES_PER_STAGE + 1}", modules[start : start + MODULES_PER_STAGE])
        for start in range(0, len(modules), MODULES_PER_STAGE)
    ]
    return build_framework(stages)


def add_roadmap(
    connection: Connection,
    roadmap_id: str,
    concepts: Sequence[ConceptSeed],
    *,
    age_minutes: int = 0,
) -> None:
    insert_roadmap(
        connection,
        roadmap_id,
        USER_ID,
        framework_of(concepts),
        title=f"Benchmark roadmap {roadmap_id}",
        age_minutes=age_minutes,
    )


@dataclass(frozen=True)
class ContentRow:
    concept_id: str
    status: str
    version: int = 1
    is_latest: bool = True


def add_content_rows(
    connection: Connection, content_type: ContentType, roadmap_id: str, rows: Sequence[ContentRow]
) -> None:
    """Insert content rows of one type, in one statement."""
    if not rows:
        return
    connection.execute(
        text(
            f"INSERT INTO {STORAGE[content_type].table} "
            "(roadmap_id, concept_id, title, content_status, content_version, is_latest) "
            "SELECT :roadmap_id, row.concept_id, 'Title of ' || row.concept_id, row.status, "
            "row.version, row.is_latest "
            "FROM unnest(CAST(:concept_ids AS text[]), CAST(:statuses AS text[]), "
            "CAST(:versions AS int[]), CAST(:latest AS boolean[])) "
            "AS row(concept_id, status, version, is_latest)"
        ),
        {
            "roadmap_id": roadmap_id,
            "concept_ids": [row.concept_id for row in rows],
            "statuses": [row.status for row in rows],
            "versions": [row.version for row in rows],
            "latest": [row.is_latest for row in rows],
        },
    )


def add_claims(
    connection: Connection,
    roadmap_id: str,
    claims: Sequence[tuple[str, ContentType]],
    *,
    age_minutes: int = 0,
    status: str = "queued",
) -> str:
    """A retry task holding claims on ``claims`` (concept id, content type),
    claimed ``age_minutes`` ago; returns the task id."""
    task_id = connection.execute(
        text(
            "INSERT INTO retry_tasks (roadmap_id, user_id, trigger, created_at) "
            "VALUES (:roadmap_id, :user_id, 'api', now() - make_interval(mins => :age)) "
            "RETURNING task_id"
        ),
        {"roadmap_id": roadmap_id, "user_id": USER_ID, "age": age_minutes},
    ).scalar_one()
    connection.execute(
        text(
            "INSERT INTO retry_items "
            "(task_id, roadmap_id, concept_id, content_type, reason, status, claimed_at) "
            "SELECT :task_id, :roadmap_id, claim.concept_id, claim.content_type, 'missing', "
            ":status, now() - make_interval(mins => :age) "
            "FROM unnest(CAST(:concept_ids AS text[]), CAST(:content_types AS text[])) "
            "AS claim(concept_id, content_type)"
        ),
        {
            "task_id": task_id,
            "roadmap_id": roadmap_id,
            "concept_ids": [concept_id for concept_id, _ in claims],
            "content_types": [content_type.value for _, content_type in claims],
            "status": status,
            "age": age_minutes,
        },
    )
    return str(task_id)


def tutorials_lost(index: int) -> dict[ContentType, str | None]:
    """The seed's failure, at any size: the tutorial was never saved (status null
    or processing, no row); the resource list and quiz are completed."""
    return {
        ContentType.TUTORIAL: "processing" if index % 2 else None,
        ContentType.RESOURCES: "completed",
        ContentType.QUIZ: "completed",
    }


def add_lost_tutorials_roadmap(connection: Connection, roadmap_id: str, concepts: int) -> None:
    """A roadmap of ``concepts`` concepts whose tutorials were all lost (rows for the
    completed resource lists and quizzes), so its plan has one item per concept."""
    seeds = concept_seeds(concepts, tutorials_lost)
    add_roadmap(connection, roadmap_id, seeds, age_minutes=24 * 60)
    for content_type in (ContentType.RESOURCES, ContentType.QUIZ):
        add_content_rows(
            connection,
            content_type,
            roadmap_id,
            [ContentRow(c.concept_id, "completed") for c in seeds],
        )
