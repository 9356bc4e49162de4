"""A fourth content type needs its declaration, its generated model and its generators only.

The test copies the runtime package, adds a ``glossary`` type by editing
exactly those three places (``content_types.py``, ``generated.py``,
``generators/template.py``), and runs the copy in a scratch schema: the
schema upgrade makes its table and indexes, the sweep finds a roadmap whose
glossary is missing, the judge plans it, the worker saves it, and the
framework status follows. No other file of the pipeline is touched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.support import REPO_ROOT

# (file, anchor line, lines to insert, before or after the anchor)
EDITS: list[tuple[str, str, str, str]] = [
    ("content_types.py", '    QUIZ = "quiz"\n', '    GLOSSARY = "glossary"\n', "after"),
    (
        "content_types.py",
        "STORAGE: dict[ContentType, ContentStorage] = {\n",
        "    ContentType.GLOSSARY: ContentStorage(\n"
        '        "glossaries", "id", "terms", PayloadFormat.JSON, "glossary_status"\n'
        "    ),\n",
        "after",
    ),
    (
        "generated.py",
        "CONTENT_MODELS: dict[ContentType, type[ContentModel]] = {\n",
        "class Term(_Content):\n"
        "    term: ShortText\n"
        "    meaning: ShortText\n"
        "\n\n"
        "class GlossaryContent(ContentModel):\n"
        "    terms: Annotated[list[Term], Field(min_length=1, max_length=50)]\n"
        "\n"
        "    def stored_title(self, concept_name: str) -> str:\n"
        '        return f"Glossary: {concept_name}"\n'
        "\n"
        "    def stored_payload(self) -> Any:\n"
        '        return self.model_dump(mode="json")["terms"]\n'
        "\n\n",
        "before",
    ),
    (
        "generated.py",
        "CONTENT_MODELS: dict[ContentType, type[ContentModel]] = {\n",
        "    ContentType.GLOSSARY: GlossaryContent,\n",
        "after",
    ),
    (
        "generated.py",
        "    quiz: QuizContent | None = None\n",
        "    glossary: GlossaryContent | None = None\n",
        "after",
    ),
    (
        "generators/template.py",
        "            ContentType.QUIZ: self._quiz,\n",
        "            ContentType.GLOSSARY: _glossary,\n",
        "after",
    ),
    (
        "generators/template.py",
        "class TemplateGenerator:\n",
        "def _glossary(concept: Concept, preferences: Preferences) -> ContentModel:\n"
        "    from content_retry.generated import CONTENT_MODELS\n"
        "\n"
        "    return CONTENT_MODELS[ContentType.GLOSSARY].model_validate(\n"
        '        {"terms": [{"term": concept.name, "meaning": concept.description or concept.name}]}\n'
        "    )\n"
        "\n\n",
        "before",
    ),
]

# Runs with the edited package first on sys.path; prints what it found as JSON.
PROBE = """
import json, sys
package_root, database_url, schema = sys.argv[1:4]
sys.path.insert(0, package_root)

import boto3
from moto import mock_aws
from sqlalchemy import event, text

import content_retry
from content_retry.content_types import ContentType, parse_content_types
from content_retry.database import build_engine
from content_retry.generators.template import TemplateGenerator
from content_retry.retries import DetectDependencies
from content_retry.settings import Settings
from content_retry.sweep import sweep
from content_retry.worker import WorkerDependencies, handle_retry_batch
from content_retry_local.lambda_runtime import sqs_record
from content_retry_local.schema import upgrade
from content_retry_local.seed import ConceptSeed, insert_content_row, insert_roadmap
from content_retry_local.seed import single_module_framework
from content_retry_local.template import create_queues

assert content_retry.__file__.startswith(package_root), content_retry.__file__
engine = build_engine(Settings(DATABASE_URL=database_url))

@event.listens_for(engine, "connect")
def _scratch(dbapi_connection, record):
    cursor = dbapi_connection.cursor()
    cursor.execute(f'SET search_path TO "{schema}"')
    cursor.close()

report = upgrade(engine)
done = {"content_status": "completed", "resources_status": "completed",
        "quiz_status": "completed", "glossary_status": "completed"}
concepts = [
    ConceptSeed("c1", "Caching", "Keeping what repeats.", {**done, "glossary_status": None}),
    ConceptSeed("c2", "Batching", "Doing many at once.", done),
]
with engine.begin() as connection:
    insert_roadmap(connection, "r1", "u-1", single_module_framework(concepts), age_minutes=120)
    for concept in ("c1", "c2"):
        for content_type in ContentType:
            if (concept, content_type) != ("c1", ContentType.GLOSSARY):
                insert_content_row(connection, content_type, "r1", concept, "completed")

with mock_aws():
    sqs = boto3.client("sqs", region_name="us-east-1")
    queue_url, dlq_url = create_queues(sqs)
    settings = Settings(DATABASE_URL=database_url, RETRY_QUEUE_URL=queue_url,
                        RETRY_DLQ_URL=dlq_url)
    swept = sweep(DetectDependencies(engine, sqs, settings))
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10)["Messages"]
    event_ = {"Records": [sqs_record(m["Body"], m["MessageId"]) for m in messages]}
    worker = WorkerDependencies(engine, sqs, settings, TemplateGenerator())
    response = handle_retry_batch(event_, None, worker)

with engine.connect() as connection:
    saved = connection.execute(text(
        "SELECT concept_id, title, terms, content_version FROM glossaries "
        "WHERE is_latest AND content_status = 'completed' ORDER BY concept_id")).all()
    framework = connection.execute(text("SELECT framework_data FROM roadmap_metadata")).scalar_one()
    ledger = connection.execute(text("SELECT content_type, status FROM retry_items")).all()
print("PROBE " + json.dumps({
    "tables_created": report.tables_created,
    "indexes_built": report.indexes_built,
    "parsed": [t.value for t in parse_content_types(["glossary", "quiz"])],
    "sweep": swept.as_response(),
    "message_items": [json.loads(m["Body"])["items"] for m in messages],
    "response": response,
    "saved": [[row.concept_id, row.title, row.terms, row.content_version] for row in saved],
    "framework": {c["concept_id"]: c.get("glossary_status")
                  for c in framework["stages"][0]["modules"][0]["concepts"]},
    "ledger": [list(row) for row in ledger],
}))
"""


def add_glossary(package: Path) -> None:
    """Edit the copy as a developer adding the type would, failing loudly if an
    anchor is gone (the places a content type is declared have moved)."""
    for relative, anchor, lines, where in EDITS:
        path = package / relative
        source = path.read_text()
        assert source.count(anchor) == 1, f"{relative}: anchor {anchor!r} not found once"
        replacement = anchor + lines if where == "after" else lines + anchor
        path.write_text(source.replace(anchor, replacement))


@pytest.fixture
def scratch_schema(db: Engine) -> Iterator[str]:
    name = f"scratch_{uuid.uuid4().hex[:12]}"
    with db.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{name}"'))
    yield name
    with db.begin() as connection:
        connection.execute(text(f'DROP SCHEMA "{name}" CASCADE'))


def test_a_fourth_content_type_works_end_to_end_from_three_files(
    tmp_path: Path, database_url: str, scratch_schema: str
) -> None:
    # GIVEN the runtime package with a glossary type added in its three places only
    package = tmp_path / "content_retry"
    shutil.copytree(
        REPO_ROOT / "layers/common/content_retry",
        package,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    add_glossary(package)
    changed = {relative for relative, *_ in EDITS}
    assert changed == {"content_types.py", "generated.py", "generators/template.py"}

    # WHEN that copy upgrades a scratch schema, sweeps, plans and saves
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), database_url, scratch_schema],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(
        next(line for line in run.stdout.splitlines() if line.startswith("PROBE "))[6:]
    )

    # THEN the type got its table and indexes, the sweep found the missing
    # glossary, the worker saved it, and the framework and ledger say so
    assert "glossaries" in found["tables_created"]
    assert {"glossaries_one_latest_per_concept", "glossaries_unfinished_latest"} <= set(
        found["indexes_built"]
    )
    assert found["parsed"] == ["quiz", "glossary"]
    assert found["sweep"] == {"roadmaps_scanned": 1, "roadmaps_planned": 1, "retried_count": 1}
    assert found["message_items"] == [[{"content_type": "glossary", "reason": "missing"}]]
    assert found["response"] == {"batchItemFailures": []}
    assert found["saved"] == [
        ["c1", "Glossary: Caching", [{"term": "Caching", "meaning": "Keeping what repeats."}], 1],
        ["c2", "c2", [], 1],
    ]
    assert found["framework"] == {"c1": "completed", "c2": "completed"}
    assert found["ledger"] == [["glossary", "succeeded"]]
