"""A person's first hour: seed, serve, a retry by curl, its task view, the docs
offline, quiet output, clean stops (issue 22).

The README's "Your first hour" commands are run as written (the port and the
task id put in), each in a new process, on a machine with nothing configured.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from content_retry.plan.build import build_retry_plan
from content_retry_local.http_api import DOCS_CSP, api_gateway_event, make_server
from content_retry_local.lambda_runtime import invoke
from content_retry_local.postgres import psql_executable, running_server
from content_retry_local.samples import COMPLETE, PROMPTS, SEED, THEIRS, seed_samples
from content_retry_local.seed import ConceptSeed, insert_roadmap, single_module_framework
from tests.conftest import REPO_ROOT, Queues
from tests.functional.test_local_runtime import cli_environment, run_cli

README = (REPO_ROOT / "README.md").read_text()
CLI = [sys.executable, "-m", "content_retry_local.cli"]


def readme_section(title: str) -> str:
    """The text of one ``## title`` section of the README."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match[1]


def readme_commands(title: str) -> list[str]:
    """The shell lines of a README section's ``sh`` blocks, comments dropped."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", readme_section(title), re.S):
        for line in block.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command:
                lines.append(command)
    return lines


def as_run_here(command: str, port: int, task_id: str | None = None) -> list[str]:
    """A README line as this test runs it: our interpreter for .venv/bin/content-retry,
    the server's port for 8080, the task id for TASK_ID."""
    command = command.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    if task_id:
        command = command.replace("TASK_ID", task_id)
    words = shlex.split(command)
    if words[0] == ".venv/bin/content-retry":
        return [*CLI, *words[1:]]
    return words


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A folder of a fresh clone's user; its background moto server stopped after."""
    yield tmp_path
    run_cli(tmp_path, None, "stop")


def start_serve(cwd: Path, *arguments: str) -> tuple[subprocess.Popen[str], int]:
    """``content-retry serve`` in the background on a free port; (process, port)."""
    process = subprocess.Popen(
        [*CLI, *arguments, "--port", "0"],
        cwd=cwd,
        env=cli_environment(None),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()  # printed once it listens
    found = re.search(r"http://127\.0\.0\.1:(\d+)", first)
    if found is None:
        process.kill()
        pytest.fail(f"serve did not start: {first}{process.communicate()}")
    return process, int(found[1])


def run_line(words: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        words,
        cwd=cwd,
        env=cli_environment(None),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl: the README's requests use it")
def test_the_readmes_first_hour_works_on_a_fresh_machine(workdir: Path) -> None:
    # GIVEN the README's first-hour commands, on a machine with nothing configured
    setup = readme_commands("Your first hour")
    assert setup[:2] == [
        ".venv/bin/content-retry seed",
        ".venv/bin/content-retry serve --dev-identity",
    ]
    retry, view, drain, view_again, query = setup[2:]

    # WHEN the sample roadmaps are seeded (twice: the second run starts them over)
    seeded = run_line(as_run_here(setup[0], 0), workdir)
    again = run_line(as_run_here(setup[0], 0), workdir)

    # THEN it says what it seeded: each roadmap's id and owner, and how to try them
    assert seeded.returncode == 0, seeded.stdout + seeded.stderr
    assert again.stdout == seeded.stdout
    for sample in (SEED, PROMPTS, COMPLETE, THEIRS):
        assert f"{sample.roadmap_id}  owner {sample.user_id}" in seeded.stdout
    assert "a retry would plan tutorial 21" in seeded.stdout
    assert "serve --dev-identity" in seeded.stdout and "X-Dev-User" in seeded.stdout

    # WHEN the API is served with the development identity, and curl asks for a retry
    server, port = start_serve(workdir, *shlex.split(setup[1])[1:])
    try:
        asked = run_line(as_run_here(retry, port), workdir)
        answer = json.loads(asked.stdout)
        task_id = answer["task_id"]

        # THEN 21 tutorials are queued, the task view says so, drain generates them,
        # and the task view and the database then say they are saved
        assert answer["retried_count"] == 21, asked.stdout
        queued = json.loads(run_line(as_run_here(view, port, task_id), workdir).stdout)
        assert (queued["status"], queued["counts"]["queued"]) == ("queued", 21)
        drained = run_line(as_run_here(drain, port), workdir)
        assert "21 done, 0 failed" in drained.stdout, drained.stdout + drained.stderr
        done = json.loads(run_line(as_run_here(view_again, port, task_id), workdir).stdout)
        assert (done["status"], done["counts"]["succeeded"]) == ("completed", 21)
        rows = run_line(as_run_here(query, port), workdir)
        assert re.search(r"completed\s+\|\s+31", rows.stdout), rows.stdout + rows.stderr

        # WHEN the server is stopped as a service manager stops it
        server.send_signal(signal.SIGTERM)
        _, errors = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()

    # THEN it ends cleanly, and so does the embedded PostgreSQL it started
    assert server.returncode == 0, errors
    assert running_server(workdir / ".local" / "pgdata") is None


def test_a_killed_command_does_not_keep_the_database_running_for_good(workdir: Path) -> None:
    # GIVEN a server killed outright (no exit handler ran): its PostgreSQL is orphaned
    server, _ = start_serve(workdir, "serve")
    server.kill()
    server.communicate()
    data = workdir / ".local" / "pgdata"
    assert running_server(data) is not None

    # WHEN the next command runs and ends
    status = run_cli(workdir, None, "status", "9b2c0f4e-3d1a-4c55-9a8e-2f6d7c1b5a90")

    # THEN it stopped the database as the last process using it
    assert status.returncode == 1 and "no task" in status.stderr
    assert running_server(data) is None


def test_seeding_is_idempotent_and_touches_no_other_roadmap(
    connection: Any, db: Engine, queues: Queues
) -> None:
    # GIVEN someone's roadmap, and the samples seeded once and retried
    insert_roadmap(
        connection, "theirs", "u-1", single_module_framework([ConceptSeed("x", "X", "")])
    )
    seed_samples(connection)
    connection.commit()
    first = invoke("detect", retry_event(SEED.roadmap_id, SEED.user_id))
    assert first["statusCode"] == 202

    # WHEN it is seeded again
    with db.begin() as again:
        seeded = seed_samples(again)

    # THEN the samples are back as seeded (the retry's task gone with them), the
    # other roadmap is untouched, and each sample shows what the README says
    by_id = {roadmap.sample.roadmap_id: roadmap for roadmap in seeded}
    assert by_id[SEED.roadmap_id].would_retry == {"tutorial": 21, "resources": 2, "quiz": 3}
    assert by_id[PROMPTS.roadmap_id].reasons == {"failed": 2, "stale": 1, "missing": 1}
    assert by_id[COMPLETE.roadmap_id].would_retry == {}
    assert by_id[THEIRS.roadmap_id].would_retry == {"tutorial": 2}
    with db.connect() as check:
        tasks = check.execute(text("SELECT count(*) FROM retry_tasks")).scalar_one()
        owner = check.execute(
            text("SELECT user_id FROM roadmap_metadata WHERE roadmap_id = 'theirs'")
        ).scalar_one()
        plan = build_retry_plan(check, SEED.roadmap_id, ["tutorial"])
    assert (tasks, owner, plan.item_count) == (0, "u-1", 21)


def retry_event(roadmap_id: str, caller: str) -> dict[str, Any]:
    body = json.dumps({"content_types": ["tutorial"]})
    headers = {"Content-Type": "application/json"}
    return api_gateway_event("POST", f"/roadmaps/{roadmap_id}/retry", headers, body, caller)


@pytest.mark.parametrize(
    ("sample", "caller", "status", "retried"),
    [
        (COMPLETE, COMPLETE.user_id, 200, 0),
        (THEIRS, SEED.user_id, 404, None),
        (THEIRS, THEIRS.user_id, 202, 2),
        (PROMPTS, PROMPTS.user_id, 202, 3),
    ],
    ids=["nothing-to-retry", "someone-elses", "its-owner", "each-reason"],
)
def test_each_sample_answers_the_retry_as_seed_says(
    connection: Any, queues: Queues, sample: Any, caller: str, status: int, retried: int | None
) -> None:
    # GIVEN the samples
    seed_samples(connection)
    connection.commit()

    # WHEN a tutorial retry is asked for, as the caller
    response = invoke("detect", retry_event(sample.roadmap_id, caller))

    # THEN the answer is the one `seed` promises for that roadmap
    assert response["statusCode"] == status, response
    if retried is not None:
        assert json.loads(response["body"])["retried_count"] == retried


@pytest.fixture
def docs_server() -> Iterator[str]:
    """The local API (no database needed for its documents), on a free port."""
    server = make_server(0, dev_identity=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, dict(response.headers.items()), response.read()


def test_the_docs_page_needs_no_other_host(docs_server: str) -> None:
    # WHEN the docs page is fetched
    status, headers, page = fetch(docs_server + "/docs")

    # THEN it names no other host, and the browser may load nothing from one
    assert status == 200
    assert b"http://" not in page and b"https://" not in page and b"//" not in page
    assert headers["Content-Security-Policy"] == DOCS_CSP
    # and every file it loads is served here
    for path in re.findall(rb'(?:src|href)="([^"]+)"', page):
        assert path.startswith(b"/"), path
        status, headers, body = fetch(docs_server + path.decode())
        assert status == 200 and body, path


def chromium() -> str | None:
    return next(
        (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))),
        None,
    )


@pytest.mark.skipif(
    chromium() is None,
    reason="SKIPPED LOUDLY: no chromium (apt-get install chromium; .ci/run installs it): "
    "the docs page was not loaded in a browser",
)
def test_the_docs_page_lists_the_operations_in_a_browser_without_the_internet(
    docs_server: str,
) -> None:
    # GIVEN a headless Chromium that can resolve no host but this machine
    profile = tempfile.mkdtemp(prefix="content-retry-chromium-")
    try:
        # WHEN it loads /docs and runs its scripts
        run = subprocess.run(
            [
                str(chromium()),
                "--headless",
                "--no-sandbox",  # as root (CI), Chromium refuses its sandbox
                "--disable-gpu",
                f"--user-data-dir={profile}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--virtual-time-budget=20000",
                "--dump-dom",
                docs_server + "/docs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)

    # THEN Swagger UI rendered the document: every operation of it is listed
    assert run.returncode == 0, run.stderr[-2000:]
    listed = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', run.stdout))
    document = json.loads(fetch(docs_server + "/openapi.json")[2])
    assert listed == set(document["paths"]), run.stdout[-2000:]
    assert {"/roadmaps/{roadmap_id}/retry", "/retry-tasks/{task_id}"} <= listed


def test_commands_print_no_warnings_a_person_cannot_act_on(workdir: Path) -> None:
    # GIVEN a shell without XDG_RUNTIME_DIR (containers, CI), Python's warnings as a
    # person's terminal shows them
    environment = cli_environment(None)
    environment.pop("XDG_RUNTIME_DIR", None)
    environment.pop("PYTHONWARNINGS", None)

    # WHEN a handler is invoked with nothing to do (no metric to publish)
    run = subprocess.run(
        [*CLI, "invoke", "detect", "--event", str(REPO_ROOT / "events/api-retry.json")],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # THEN it answers, with neither platformdirs' nor Powertools' warning
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["statusCode"] == 404  # nothing seeded here
    assert "XDG_RUNTIME_DIR" not in run.stderr
    assert "Warning" not in run.stderr and "No application metrics" not in run.stderr
    assert run.stderr.count("\n") == 1, run.stderr  # the one "using ..." line


def test_make_lint_runs_bandit_to_print_findings_only() -> None:
    # GIVEN the bandit command make lint runs
    makefile = (REPO_ROOT / "Makefile").read_text()
    line = next(line.strip() for line in makefile.splitlines() if "/bandit " in line)
    words = shlex.split(line.replace("$(BIN)", str(Path(sys.executable).parent)))

    # WHEN it runs
    run = subprocess.run(
        words, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )

    # THEN it passes and says nothing: no "nosec encountered" noise
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout + run.stderr == ""


def test_the_test_database_is_kept_where_no_other_pytest_session_resets_it(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # GIVEN the session's embedded PostgreSQL (TEST_DATABASE_URL names a server of its own)
    if os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("TEST_DATABASE_URL: no embedded PostgreSQL in this session")
    socket_path = Path(database_url.split("unix_sock=", 1)[1])

    # THEN its data is in a folder of the harness's own, not under pytest's
    # temporary root (whose permissions every pytest session resets)
    folder = socket_path.parent.parent
    assert folder.name.startswith("content-retry-pg-")
    assert folder.parent == Path(tempfile.gettempdir())
    pytest_root = tmp_path_factory.getbasetemp().resolve()
    assert pytest_root not in folder.resolve().parents


def test_the_demo_names_its_generator_and_its_tokens_and_keeps_its_database(
    workdir: Path,
) -> None:
    # WHEN the demo runs with --keep
    run = run_cli(workdir, None, "demo", "--keep")

    # THEN it names the generator that ran and says what its 0 tokens mean
    assert run.returncode == 0, run.stdout + run.stderr
    assert "LLM: template generator" in run.stdout and "as configured" not in run.stdout
    assert "0 input and 0 output tokens" in run.stdout
    assert "the template generator writes the content itself and calls no model" in run.stdout
    # it tells step 4 as the README does
    story = "the 8th save loses its database connection"
    assert story in run.stdout
    assert story in " ".join(readme_section("The two commands").split())

    # and the database it leaves running answers the psql URL it printed
    url = re.search(r"psql '([^']+)'", run.stdout)
    assert url, run.stdout
    query = subprocess.run(
        [str(psql_executable()), url[1], "-Atc", "SELECT count(*) FROM tutorials WHERE is_latest"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert query.stdout.strip() == "31", query.stdout + query.stderr
    # as does its `sql --demo` line
    sql = re.search(r'sql --demo "([^"]+)"', run.stdout)
    assert sql, run.stdout
    rows = run_cli(workdir, None, "sql", "--demo", sql[1])
    assert re.search(r"completed\s+\|\s+31", rows.stdout), rows.stdout + rows.stderr

    # WHEN the local servers are stopped
    stopped = run_cli(workdir, None, "stop")

    # THEN the kept database is stopped too
    assert "stopped the PostgreSQL on .local/demo/pgdata" in stopped.stdout, stopped.stdout
    assert running_server(workdir / ".local" / "demo" / "pgdata") is None


def test_sql_without_a_statement_opens_psql_on_the_local_database(workdir: Path) -> None:
    # WHEN psql is opened by `content-retry sql` and given a statement on its input
    run = subprocess.run(
        [*CLI, "sql"],
        cwd=workdir,
        env=cli_environment(None),
        input="SELECT count(*) AS tasks FROM retry_tasks;\n",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # THEN psql answered it, on the local database (its schema current), and ended
    assert run.returncode == 0, run.stderr
    assert re.search(r"tasks\s*\n-+\n\s*0\n\(1 row\)", run.stdout), run.stdout
    assert running_server(workdir / ".local" / "pgdata") is None
