"""Saving generated content into the platform's tables, versioned (DESIGN §3, §6).

One statement saves one item: it marks the ledger item succeeded, takes
``is_latest`` from the previous version, inserts the new version (previous
+ 1), and sets the concept's framework status. Run inside the caller's
transaction, the items of one message are saved together or not at all.
The ledger update comes first and only succeeds once per item, so a
duplicate or re-driven delivery saves nothing twice.
"""

from __future__ import annotations

import json
from functools import cache

from sqlalchemy import TextClause, text
from sqlalchemy.orm import Session

from content_retry.content_types import STORAGE, ContentType
from content_retry.generated import ContentModel, QuizContent, ResourcesContent, TutorialContent
from content_retry.ledger import ItemKey
from content_retry.roadmaps import array_or_empty


@cache
def _save_statement(content_type: ContentType) -> TextClause:
    storage = STORAGE[content_type]
    payload_column, payload_value = {
        ContentType.TUTORIAL: ("content", ":payload"),
        ContentType.RESOURCES: ("resources", "CAST(:payload AS jsonb)"),
        ContentType.QUIZ: ("questions", "CAST(:payload AS jsonb)"),
    }[content_type]
    table = storage.table
    # Data-modifying CTEs run against one snapshot; each step is gated on the
    # one before (EXISTS), which also orders them: the previous version loses
    # is_latest before the new one is inserted, as the unique index requires.
    # - item: the ledger, not the message, says which roadmap the item is in.
    # - concept_path: where the concept sits in framework_data (first listing).
    # - framework: jsonb_set at that one path, not a rebuild of the tree. An
    #   UPDATE that waited for another writer's lock re-reads the row, so
    #   statuses of other concepts written meanwhile are kept; the concept_id
    #   check skips the status (never the content) if the roadmap was
    #   restructured meanwhile.
    # No SQL comments inside: pg8000 rescans the text on every execution.
    return text(
        f"""
WITH item AS (
  UPDATE retry_items
  SET status = 'succeeded', last_error = NULL, updated_at = now()
  WHERE task_id = CAST(:task_id AS uuid) AND concept_id = :concept_id
    AND content_type = :content_type AND status <> 'succeeded'
    AND roadmap_id = :roadmap_id
  RETURNING roadmap_id
),
previous AS (
  UPDATE {table} SET is_latest = false
  WHERE roadmap_id = :roadmap_id AND concept_id = :concept_id AND is_latest
    AND EXISTS (SELECT 1 FROM item)
  RETURNING content_version
),
saved AS (
  INSERT INTO {table}
    (roadmap_id, concept_id, title, {payload_column}, content_status, content_version, is_latest)
  SELECT :roadmap_id, :concept_id, :title, {payload_value}, 'completed',
         greatest(
           (SELECT coalesce(max(content_version), 0) FROM previous),
           (SELECT coalesce(max(content_version), 0) FROM {table}
            WHERE roadmap_id = :roadmap_id AND concept_id = :concept_id)) + 1,
         true
  FROM item
  RETURNING content_version
),
concept_path AS (
  SELECT ARRAY['stages', (s.i - 1)::text, 'modules', (m.j - 1)::text,
               'concepts', (c.k - 1)::text] AS path
  FROM roadmap_metadata AS r,
       jsonb_array_elements({array_or_empty("r.framework_data -> 'stages'")})
         WITH ORDINALITY AS s(stage, i),
       jsonb_array_elements({array_or_empty("s.stage -> 'modules'")})
         WITH ORDINALITY AS m(module, j),
       jsonb_array_elements({array_or_empty("m.module -> 'concepts'")})
         WITH ORDINALITY AS c(concept, k)
  WHERE r.roadmap_id = :roadmap_id AND c.concept ->> 'concept_id' = :concept_id
  ORDER BY s.i, m.j, c.k
  LIMIT 1
),
framework AS (
  UPDATE roadmap_metadata AS r
  SET framework_data = jsonb_set(
        r.framework_data, p.path || ARRAY['{storage.status_key}'], '"completed"'::jsonb, true)
  FROM concept_path AS p
  WHERE r.roadmap_id = :roadmap_id
    AND r.framework_data #>> (p.path || ARRAY['concept_id']) = :concept_id
    AND EXISTS (SELECT 1 FROM saved)
  RETURNING 1
)
SELECT (SELECT content_version FROM saved) AS version
"""  # noqa: S608 - table and column names come from STORAGE; values are bound  # nosec B608
    )


def _title_and_payload(content: ContentModel, concept_name: str) -> tuple[str, str]:
    if isinstance(content, TutorialContent):
        return content.title, content.content_markdown
    if isinstance(content, ResourcesContent):
        return f"Resources: {concept_name}", json.dumps(
            content.model_dump(mode="json")["resources"]
        )
    if isinstance(content, QuizContent):
        return f"Quiz: {concept_name}", json.dumps(content.model_dump(mode="json")["questions"])
    raise TypeError(f"not generated content: {type(content).__name__}")


def save_item(
    session: Session,
    key: ItemKey,
    *,
    roadmap_id: str,
    concept_name: str,
    content: ContentModel,
) -> int | None:
    """Save one item's content as its new latest version, in the caller's transaction.

    Returns the new ``content_version``, or None when the ledger says the item
    was already saved (or was never planned): then nothing is written.
    """
    title, payload = _title_and_payload(content, concept_name)
    version: int | None = session.execute(
        _save_statement(key.content_type),
        {
            "task_id": key.task_id,
            "concept_id": key.concept_id,
            "content_type": key.content_type.value,
            "roadmap_id": roadmap_id,
            "title": title,
            "payload": payload,
        },
    ).scalar_one()
    return version
