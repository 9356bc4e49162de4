"""The content versions repository: one item's save, as one statement."""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy import Connection, event, text

from content_retry.concepts import Concept
from content_retry.content_types import ContentType
from content_retry.costs import ItemCost
from content_retry.generators.template import TemplateGenerator
from content_retry.messages import Preferences
from content_retry.repositories.claims import ItemKey
from content_retry.repositories.content_versions import ItemSave, save_item

ROADMAP, USER = "r1", "u1"
FRAMEWORK = {
    "stages": [
        {"modules": [{"concepts": [{"concept_id": "c1", "quiz_status": "failed"}]}]},
        "not a stage",
        {
            "modules": [
                {"concepts": {"not": "an array"}},
                {
                    "concepts": [
                        {"concept_id": "c0"},
                        {"concept_id": "c2", "quiz_status": "failed", "name": "Two"},
                    ]
                },
            ]
        },
    ]
}


def _seed(connection: Connection) -> str:
    connection.execute(
        text(
            "INSERT INTO roadmap_metadata (roadmap_id, user_id, framework_data) "
            "VALUES (:r, :u, CAST(:f AS jsonb))"
        ),
        {"r": ROADMAP, "u": USER, "f": json.dumps(FRAMEWORK)},
    )
    connection.execute(
        text(
            "INSERT INTO quizzes (roadmap_id, concept_id, content_status, content_version) "
            "VALUES (:r, 'c2', 'failed', 1)"
        ),
        {"r": ROADMAP},
    )
    task_id: str = connection.execute(
        text(
            "INSERT INTO retry_tasks (roadmap_id, user_id, trigger) "
            "VALUES (:r, :u, 'api') RETURNING task_id"
        ),
        {"r": ROADMAP, "u": USER},
    ).scalar_one()
    connection.execute(
        text(
            "INSERT INTO retry_items (task_id, roadmap_id, concept_id, content_type, reason) "
            "VALUES (:t, :r, 'c2', 'quiz', 'failed')"
        ),
        {"t": task_id, "r": ROADMAP},
    )
    return task_id


def _save(connection: Connection, task_id: str, cost: ItemCost) -> ItemSave:
    concept = Concept(concept_id="c2", name="Two")
    content = TemplateGenerator().generate(concept, ContentType.QUIZ, Preferences()).content
    return save_item(
        connection,
        ItemKey(task_id, "c2", ContentType.QUIZ),
        roadmap_id=ROADMAP,
        user_id=USER,
        concept_name="Two",
        content=content,
        cost=cost,
    )


def test_a_save_inserts_the_next_version_sets_the_status_and_records_the_item(
    connection: Connection,
) -> None:
    # GIVEN a failed quiz (version 1, latest) planned for retry, its concept
    # listed in a framework_data malformed in places
    task_id = _seed(connection)
    statements: list[str] = []

    def grab(*args: Any) -> None:
        statements.append(args[2])

    event.listen(connection, "before_cursor_execute", grab)

    # WHEN its new content is saved
    saved = _save(connection, task_id, ItemCost(llm_calls=2, input_tokens=30, output_tokens=7))
    event.remove(connection, "before_cursor_execute", grab)

    # THEN in one statement: version 2 is the one latest row, the concept's status
    # (and only its) is completed, the item succeeded with what it cost
    assert saved == ItemSave(version=2, recorded=True)
    assert len(statements) == 1
    rows = connection.execute(
        text("SELECT content_version, content_status, is_latest FROM quizzes ORDER BY 1")
    ).all()
    assert [tuple(row) for row in rows] == [(1, "failed", False), (2, "completed", True)]
    framework = connection.execute(text("SELECT framework_data FROM roadmap_metadata")).scalar_one()
    expected = json.loads(json.dumps(FRAMEWORK))
    expected["stages"][2]["modules"][1]["concepts"][1]["quiz_status"] = "completed"
    assert framework == expected
    item = connection.execute(
        text("SELECT status, llm_calls, input_tokens, output_tokens FROM retry_items")
    ).one()
    assert tuple(item) == ("succeeded", 2, 30, 7)
    # The parameters, named unlike the updated tables' columns, added no SET clause.
    assert not re.search(
        r"\b(task_id|concept_id|content_type|roadmap_id|user_id|title)=", statements[0]
    )

    # WHEN the same item is saved again (a duplicate delivery)
    again = _save(connection, task_id, ItemCost(llm_calls=1, input_tokens=1, output_tokens=1))

    # THEN nothing is written, the cost included
    assert again == ItemSave(version=None, recorded=False)
    assert connection.execute(text("SELECT count(*) FROM quizzes")).scalar_one() == 2
    assert connection.execute(text("SELECT llm_calls FROM retry_items")).scalar_one() == 2


def test_a_save_for_another_owner_writes_nothing(connection: Connection) -> None:
    # GIVEN an item planned for USER's roadmap
    task_id = _seed(connection)

    # WHEN a message naming another owner saves it
    concept = Concept(concept_id="c2", name="Two")
    content = TemplateGenerator().generate(concept, ContentType.QUIZ, Preferences()).content
    saved = save_item(
        connection,
        ItemKey(task_id, "c2", ContentType.QUIZ),
        roadmap_id=ROADMAP,
        user_id="someone else",
        concept_name="Two",
        content=content,
    )

    # THEN nothing is saved nor recorded
    assert saved == ItemSave(version=None, recorded=False)
    assert connection.execute(text("SELECT count(*) FROM quizzes")).scalar_one() == 1
    assert connection.execute(text("SELECT status FROM retry_items")).scalar_one() == "queued"
