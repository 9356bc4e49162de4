"""The platform's roadmaps: ownership, and the concept statuses in ``framework_data``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, text


@dataclass(frozen=True)
class RoadmapRef:
    roadmap_id: str
    user_id: str


def lock_roadmap(connection: Connection, roadmap_id: str) -> RoadmapRef | None:
    """Fetch a roadmap's owner and lock its row until the transaction ends.

    The lock serialises the writers of one roadmap's ``framework_data`` and makes
    two concurrent retry requests for one roadmap plan one after the other, so
    the second sees the first's claims and enqueues nothing twice.
    """
    row = connection.execute(
        text("SELECT user_id FROM roadmap_metadata WHERE roadmap_id = :roadmap_id FOR UPDATE"),
        {"roadmap_id": roadmap_id},
    ).one_or_none()
    return None if row is None else RoadmapRef(roadmap_id=roadmap_id, user_id=row.user_id)


def array_or_empty(expression: str) -> str:
    """SQL for the jsonb array at ``expression``, or an empty one.

    jsonb_array_elements fails on anything but an array: a framework_data that
    is malformed in one place is then read (and patched) where it is well-formed.
    """
    return f"CASE WHEN jsonb_typeof({expression}) = 'array' THEN {expression} ELSE '[]'::jsonb END"


# One statement rebuilds stages -> modules -> concepts, merging each concept's
# patch (bound as :patches, a JSON object) by concept_id; it serves repairs
# and permanent failures, several concepts at once (a save sets one status
# with jsonb_set instead, content_store.py). Being a single UPDATE, it is
# computed on the newest row version after any lock wait, so concurrent
# writers of other concepts' statuses are never overwritten (no
# read-modify-write in Python).
_PATCH_CONCEPTS = text(
    f"""
UPDATE roadmap_metadata AS r
SET framework_data = jsonb_set(r.framework_data, '{{stages}}', (
  SELECT coalesce(jsonb_agg(
    CASE WHEN jsonb_typeof(s.stage -> 'modules') = 'array'
    THEN jsonb_set(s.stage, '{{modules}}', (
      SELECT coalesce(jsonb_agg(
        CASE WHEN jsonb_typeof(m.module -> 'concepts') = 'array'
        THEN jsonb_set(m.module, '{{concepts}}', (
          SELECT coalesce(jsonb_agg(
            CASE WHEN jsonb_typeof(c.concept) = 'object'
                 THEN c.concept || coalesce(
                   CAST(:patches AS jsonb) -> (c.concept ->> 'concept_id'), '{{}}'::jsonb)
                 ELSE c.concept END
            ORDER BY c.k), '[]'::jsonb)
          FROM jsonb_array_elements({array_or_empty("m.module -> 'concepts'")})
               WITH ORDINALITY AS c(concept, k)))
        ELSE m.module END
        ORDER BY m.j), '[]'::jsonb)
      FROM jsonb_array_elements({array_or_empty("s.stage -> 'modules'")})
           WITH ORDINALITY AS m(module, j)))
    ELSE s.stage END
    ORDER BY s.i), '[]'::jsonb)
  FROM jsonb_array_elements(r.framework_data -> 'stages') WITH ORDINALITY AS s(stage, i)))
WHERE r.roadmap_id = :roadmap_id AND jsonb_typeof(r.framework_data -> 'stages') = 'array'"""  # noqa: S608 - constant fragments; values are bound  # nosec B608
)


def patch_concept_statuses(
    connection: Connection, roadmap_id: str, patches: Mapping[str, Mapping[str, str]]
) -> bool:
    """Set framework statuses of concepts, in one statement.

    Args:
        patches: ``{concept_id: {status_key: status}}``, e.g.
            ``{"c7": {"content_status": "completed"}}``.

    Returns:
        Whether the roadmap was found with a well-formed ``stages`` array.
    """
    if not patches:
        return True
    result = connection.execute(
        _PATCH_CONCEPTS, {"roadmap_id": roadmap_id, "patches": json.dumps(patches)}
    )
    return bool(result.rowcount)
