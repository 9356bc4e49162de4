"""The roadmaps' statements on a real PostgreSQL: the status patch, the sweep's
candidates (through the partial index) and its visits."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, text

from content_retry.repositories import roadmaps
from content_retry_local.explain import explain
from content_retry_local.seed import insert_roadmap


def _framework(connection: Connection, roadmap_id: str) -> Any:
    return connection.execute(
        text("SELECT framework_data FROM roadmap_metadata WHERE roadmap_id = :r"), {"r": roadmap_id}
    ).scalar_one()


def test_the_patch_sets_statuses_by_concept_id_and_keeps_the_rest(connection: Connection) -> None:
    # GIVEN a framework with malformed parts around well-formed ones
    framework = {
        "title": "kept",
        "stages": [
            {"name": "broken", "modules": "not a list"},
            {
                "name": "ok",
                "modules": [
                    {"name": "m1", "concepts": [{"concept_id": "c1", "quiz_status": "x"}, 7]},
                    {"name": "m2", "concepts": {"not": "a list"}},
                    {"name": "m3", "concepts": [{"concept_id": "c2"}, {"concept_id": "c3"}]},
                ],
            },
        ],
    }
    insert_roadmap(connection, "r1", "u-1", framework)

    # WHEN two concepts' statuses are patched in one statement
    found = roadmaps.patch_concept_statuses(
        connection,
        "r1",
        {"c1": {"content_status": "completed"}, "c3": {"quiz_status": "failed"}},
    )

    # THEN those statuses are set, and everything else is as it was, in order
    assert found is True
    modules = framework["stages"][1]["modules"]  # type: ignore[index]
    modules[0]["concepts"][0]["content_status"] = "completed"
    modules[2]["concepts"][1]["quiz_status"] = "failed"
    assert _framework(connection, "r1") == framework


def test_the_patch_reports_a_roadmap_without_stages(connection: Connection) -> None:
    insert_roadmap(connection, "r1", "u-1", {"stages": "not a list"})

    assert roadmaps.patch_concept_statuses(connection, "r1", {"c1": {"quiz_status": "x"}}) is False
    assert (
        roadmaps.patch_concept_statuses(connection, "nope", {"c1": {"quiz_status": "x"}}) is False
    )
    assert roadmaps.patch_concept_statuses(connection, "nope", {}) is True


def test_lock_roadmap_reads_the_owner(connection: Connection) -> None:
    insert_roadmap(connection, "r1", "u-1", {"stages": []})

    assert roadmaps.lock_roadmap(connection, "r1") == roadmaps.RoadmapRef("r1", "u-1")
    assert roadmaps.lock_roadmap(connection, "nope") is None


def test_a_sweep_visit_is_recorded_once_per_roadmap(connection: Connection) -> None:
    insert_roadmap(connection, "r1", "u-1", {"stages": []})
    swept_at = text("SELECT roadmap_id, swept_at FROM roadmap_sweeps")

    roadmaps.record_swept(connection, "r1")
    first = connection.execute(swept_at).all()
    connection.commit()
    roadmaps.record_swept(connection, "r1")
    roadmaps.record_swept(connection, "deleted")  # gone since it was selected: nothing
    second = connection.execute(swept_at).all()

    assert [row.roadmap_id for row in second] == ["r1"]
    assert second[0].swept_at > first[0].swept_at


def _seed(connection: Connection, total: int, needing_work: int) -> None:
    """``total`` one-concept roadmaps, a day old; ``needing_work`` of them lack a tutorial."""
    complete = {"content_status": "completed", "resources_status": "completed"}
    connection.execute(
        text(
            "INSERT INTO roadmap_metadata (roadmap_id, user_id, framework_data, updated_at) "
            "SELECT 'r' || n, 'u', jsonb_build_object('stages', jsonb_build_array("
            "  jsonb_build_object('modules', jsonb_build_array(jsonb_build_object("
            "    'concepts', jsonb_build_array(jsonb_build_object('concept_id', 'c1') || "
            "      CAST(:status AS jsonb) || jsonb_build_object('quiz_status', "
            "        CASE WHEN n <= :needing THEN NULL ELSE 'completed' END))))))), "
            "  now() - interval '1 day' "
            "FROM generate_series(1, :total) AS n"
        ),
        {"total": total, "needing": needing_work, "status": json.dumps(complete)},
    )


def test_the_sweep_finds_its_candidates_through_the_partial_index(
    connection: Connection,
) -> None:
    # GIVEN 1,000 roadmaps, 10 of which show an item not completed
    _seed(connection, total=1000, needing_work=10)
    connection.execute(text("ANALYZE"))
    terms = {"grace_minutes": 30, "lease_minutes": 60, "retention_minutes": 5760}

    # WHEN the sweep asks for its candidates
    found = roadmaps.sweep_candidates(connection, **terms, limit=50)
    plan = explain(connection, roadmaps.sweep_candidates_statement(), {**terms, "limit": 50})

    # THEN it finds those 10, and reads roadmap_metadata through the partial index
    assert sorted(row.roadmap_id for row in found) == sorted(f"r{n}" for n in range(1, 11))
    assert {row.candidates for row in found} == {10}
    assert "roadmap_metadata_sweep_candidates" in plan, plan
    assert "Seq Scan on roadmap_metadata" not in plan, plan
