"""``content-retry seed``: roadmaps to try the API on, in the local database.

Idempotent: each run puts these roadmaps back as seeded and touches no other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, text

from content_retry.content_types import ContentType
from content_retry.plan.build import build_retry_plan
from content_retry_local.seed import (
    SEED_ROADMAP_ID,
    SEED_USER_ID,
    ConceptSeed,
    build_framework,
    insert_content_row,
    insert_roadmap,
    seed_scenario,
)

OTHER_USER_ID = "u-7"
# Old enough for the schedule's sweep, which skips roadmaps updated within
# SWEEP_GRACE_MINUTES (30 by default).
_AGE_MINUTES = 24 * 60


@dataclass(frozen=True)
class SampleRoadmap:
    """A seeded roadmap: whose it is, and what it is there to show."""

    roadmap_id: str
    user_id: str
    title: str
    shows: str


@dataclass(frozen=True)
class SeededRoadmap:
    """A sample as seeded, with what a retry of every content type would plan now."""

    sample: SampleRoadmap
    concepts: int
    would_retry: dict[str, int]
    reasons: dict[str, int]


def _concept(number: int, name: str, **statuses: str | None) -> ConceptSeed:
    return ConceptSeed(f"c{number:02d}", name, f"{name}, explained for a practitioner.", statuses)


Rows = Mapping[str, Mapping[ContentType, str]]


def _insert(
    connection: Connection,
    sample: SampleRoadmap,
    concepts: list[ConceptSeed],
    rows: Rows,
) -> None:
    """The roadmap (one stage, one module) and its content rows by concept id."""
    framework = build_framework([("Foundations", [("Core ideas", concepts)])])
    insert_roadmap(
        connection,
        sample.roadmap_id,
        sample.user_id,
        framework,
        title=sample.title,
        age_minutes=_AGE_MINUTES,
    )
    for concept_id, by_type in rows.items():
        for content_type, status in by_type.items():
            insert_content_row(connection, content_type, sample.roadmap_id, concept_id, status)


_DONE = {"content_status": "completed", "resources_status": "completed", "quiz_status": "completed"}
_ALL_DONE: Mapping[ContentType, str] = dict.fromkeys(ContentType, "completed")
# A concept's rows without a tutorial (generated, never saved, or never begun).
_NO_TUTORIAL: Mapping[ContentType, str] = {
    content_type: "completed"
    for content_type in ContentType
    if content_type is not ContentType.TUTORIAL
}

SEED = SampleRoadmap(
    SEED_ROADMAP_ID,
    SEED_USER_ID,
    "Agent performance optimisation",
    "the demo's seed: 21 tutorials generated but never saved (none says failed), "
    "3 failed quizzes, 2 failed resource lists",
)
PROMPTS = SampleRoadmap(
    "prompt-engineering-basics-k3m7w1",
    SEED_USER_ID,
    "Prompt engineering basics",
    "each reason the judge gives: a failed tutorial, a stale one (processing, no row), "
    "a missing one (no row, no status), and a failed quiz",
)
COMPLETE = SampleRoadmap(
    "rag-pipelines-complete-q2w8e4",
    SEED_USER_ID,
    "RAG pipelines",
    "nothing to retry: every item has a completed latest row (the retry answers 200, 0 items)",
)
THEIRS = SampleRoadmap(
    "kubernetes-for-ml-z9x4v6",
    OTHER_USER_ID,
    "Kubernetes for ML",
    f"{OTHER_USER_ID}'s, with 2 missing tutorials: {SEED_USER_ID} is answered 404, "
    f"as for a roadmap that does not exist; {OTHER_USER_ID} may retry it",
)


def _seed_prompts(connection: Connection) -> None:
    concepts = [
        _concept(1, "Zero-shot prompting", **_DONE),
        _concept(2, "Few-shot prompting", **{**_DONE, "content_status": "failed"}),
        _concept(3, "Chain of thought", **{**_DONE, "content_status": "processing"}),
        _concept(4, "Output formats", **{**_DONE, "content_status": None}),
        _concept(5, "Prompt injection", **{**_DONE, "quiz_status": "failed"}),
    ]
    rows: Rows = {
        "c01": _ALL_DONE,
        "c02": {**_ALL_DONE, ContentType.TUTORIAL: "failed"},
        "c03": _NO_TUTORIAL,
        "c04": _NO_TUTORIAL,
        "c05": {**_ALL_DONE, ContentType.QUIZ: "failed"},
    }
    _insert(connection, PROMPTS, concepts, rows)


def _seed_complete(connection: Connection) -> None:
    names = ("Chunking documents", "Embeddings", "Vector search", "Re-ranking")
    concepts = [_concept(number, name, **_DONE) for number, name in enumerate(names, start=1)]
    _insert(connection, COMPLETE, concepts, {c.concept_id: _ALL_DONE for c in concepts})


def _seed_theirs(connection: Connection) -> None:
    names = ("Pods and jobs", "GPU scheduling", "Model serving", "Autoscaling")
    concepts = [_concept(number, name, **_DONE) for number, name in enumerate(names, start=1)]
    for concept in concepts[2:]:
        concept.statuses = {**_DONE, "content_status": None}
    rows: Rows = {c.concept_id: _ALL_DONE if c in concepts[:2] else _NO_TUTORIAL for c in concepts}
    _insert(connection, THEIRS, concepts, rows)


SAMPLES: tuple[tuple[SampleRoadmap, Callable[[Connection], object]], ...] = (
    (SEED, lambda connection: seed_scenario(connection, other_failures=True)),
    (PROMPTS, _seed_prompts),
    (COMPLETE, _seed_complete),
    (THEIRS, _seed_theirs),
)


def seed_samples(connection: Connection) -> list[SeededRoadmap]:
    """Put the sample roadmaps in the database as seeded, in the caller's transaction.

    Roadmaps with these ids are deleted first (their content rows, retry tasks
    and ledger rows go with them): running it again starts them over.

    Returns:
        Each sample, with what a retry of every content type would plan now.
    """
    ids = [sample.roadmap_id for sample, _ in SAMPLES]
    connection.execute(
        text("DELETE FROM roadmap_metadata WHERE roadmap_id = ANY(:ids)"), {"ids": ids}
    )
    for _, insert in SAMPLES:
        insert(connection)
    return [_judged(connection, sample) for sample, _ in SAMPLES]


def _judged(connection: Connection, sample: SampleRoadmap) -> SeededRoadmap:
    # The judge's own answer, as the API would get it (it locks the roadmap:
    # fine inside the seeding transaction).
    plan = build_retry_plan(connection, sample.roadmap_id)
    reasons = {reason: n for reason, n in plan.count_by_reason().items() if n}
    concepts = connection.execute(
        text(
            "SELECT count(*) FROM roadmap_metadata AS r, "
            "jsonb_array_elements(r.framework_data -> 'stages') AS s, "
            "jsonb_array_elements(s -> 'modules') AS m, "
            "jsonb_array_elements(m -> 'concepts') AS c WHERE r.roadmap_id = :r"
        ),
        {"r": sample.roadmap_id},
    ).scalar_one()
    would_retry = {content_type: n for content_type, n in plan.count_by_type().items() if n}
    return SeededRoadmap(sample, int(concepts), would_retry, reasons)


def describe(seeded: list[SeededRoadmap]) -> list[str]:
    """What was seeded, a roadmap a line or two, for the command line."""
    lines = []
    for roadmap in seeded:
        sample = roadmap.sample
        plan = (
            ", ".join(f"{content_type} {n}" for content_type, n in roadmap.would_retry.items())
            or "nothing"
        )
        reasons = ", ".join(f"{reason} {n}" for reason, n in roadmap.reasons.items())
        lines.append(
            f"  {sample.roadmap_id}  owner {sample.user_id}, {roadmap.concepts} concepts: "
            f"a retry would plan {plan}" + (f" ({reasons})" if reasons else "")
        )
        lines.append(f"      {sample.shows}")
    return lines
