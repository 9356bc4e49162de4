"""The ``template`` generator: real, readable content from the concept's own fields.

Offline and deterministic (the same concept always gets the same content), so
the local demo and the tests need no model and no network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from urllib.parse import quote_plus

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.generated import (
    ContentModel,
    Question,
    QuizContent,
    Resource,
    ResourcesContent,
    TutorialContent,
)
from content_retry.generators.base import Generation
from content_retry.messages import Preferences

_DEPTH = {
    "beginner": "starting from first principles, with no prior knowledge assumed",
    "intermediate": "assuming you know the basics and want to apply them well",
    "advanced": "focusing on trade-offs, edge cases and measurement",
}


def _short(text: str, limit: int = 1_000) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _where(concept: Concept) -> str:
    parts = [part for part in (concept.stage, concept.module) if part]
    return " / ".join(parts) if parts else "this roadmap"


class TemplateGenerator:
    """Builds each content type from the concept's name, description, stage and module."""

    name = "template"

    def generate(
        self, concept: Concept, content_type: ContentType, preferences: Preferences
    ) -> Generation:
        writers: dict[ContentType, Callable[[Concept, Preferences], ContentModel]] = {
            ContentType.TUTORIAL: self._tutorial,
            ContentType.RESOURCES: self._resources,
            ContentType.QUIZ: self._quiz,
        }
        # No model, no tokens: the content is written from the concept's own fields.
        return Generation(writers[content_type](concept, preferences))

    def _tutorial(self, concept: Concept, preferences: Preferences) -> TutorialContent:
        description = concept.description or f"{concept.name} is a core idea of {_where(concept)}."
        depth = _DEPTH[preferences.level]
        markdown = "\n".join(
            [
                f"# {concept.name}",
                "",
                f"*Part of {_where(concept)} · level: {preferences.level}*",
                "",
                "## What it is",
                "",
                description,
                "",
                "## Why it matters",
                "",
                f"{concept.name} comes up in {_where(concept)}. This tutorial covers it {depth}.",
                "",
                "## How to approach it",
                "",
                f"1. State the problem {concept.name} solves in one sentence.",
                "2. Measure the current behaviour before changing anything.",
                f"3. Apply {concept.name} to one small, real case and measure again.",
                "4. Write down what changed, what it cost, and when you would not use it.",
                "",
                "## Check yourself",
                "",
                f"- Can you explain {concept.name} to a colleague in two minutes?",
                "- Which measurement would tell you it worked?",
                f"- What would go wrong if {concept.name} were applied everywhere?",
            ]
        )
        return TutorialContent(
            title=f"{concept.name}: a {preferences.level} tutorial",
            summary=_short(description.split(". ")[0].rstrip(".") + "."),
            content_markdown=markdown,
        )

    def _resources(self, concept: Concept, preferences: Preferences) -> ResourcesContent:
        query = quote_plus(concept.name)
        return ResourcesContent(
            resources=[
                Resource(
                    title=f"{concept.name} — encyclopedia overview",
                    url=f"https://en.wikipedia.org/w/index.php?search={query}",
                    kind="reference",
                    why="A neutral overview and the vocabulary to search further.",
                ),
                Resource(
                    title=f"Papers on {concept.name}",
                    url=f"https://scholar.google.com/scholar?q={query}",
                    kind="papers",
                    why="Primary sources, with measurements to compare against.",
                ),
                Resource(
                    title=f"Open-source code using {concept.name}",
                    url=f"https://github.com/search?q={query}&type=repositories",
                    kind="code",
                    why="Working implementations to read and run.",
                ),
            ]
        )

    def _quiz(self, concept: Concept, preferences: Preferences) -> QuizContent:
        # Where the right answer sits depends on the concept, deterministically.
        seed = int(hashlib.sha256(concept.concept_id.encode()).hexdigest(), 16)
        description = _short(concept.description or f"{concept.name} is part of {_where(concept)}.")

        def question(text: str, right: str, wrong: list[str], why: str, shift: int) -> Question:
            answer = (seed >> shift) % 4
            options = [*wrong[:answer], right, *wrong[answer:]]
            return Question(question=text, options=options, answer_index=answer, explanation=why)

        return QuizContent(
            questions=[
                question(
                    f"Which statement best describes {concept.name}?",
                    description,
                    [
                        f"{concept.name} only matters once a system is retired.",
                        f"{concept.name} is a billing term with no technical meaning.",
                        f"{concept.name} replaces the need to measure anything.",
                    ],
                    f"The roadmap defines it as: {description}",
                    0,
                ),
                question(
                    f"Where does {concept.name} sit in this roadmap?",
                    _where(concept),
                    ["An optional appendix", "The glossary only", "Outside the roadmap"],
                    f"It is taught in {_where(concept)}.",
                    2,
                ),
                question(
                    f"What should you do before applying {concept.name}?",
                    "Measure the current behaviour, so the change can be judged",
                    [
                        "Apply it everywhere at once",
                        "Remove all monitoring to reduce overhead",
                        "Skip testing because the idea is well known",
                    ],
                    "Without a baseline there is no way to tell whether it helped.",
                    4,
                ),
            ]
        )
