"""Imports run one way: handlers -> services -> repositories -> tables (issue 23, DESIGN §13).

Read from the source (every ``import``, at module level or inside a function),
so a lazy import cannot hide a dependency that runs the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

PACKAGE = REPO_ROOT / "layers" / "common" / "content_retry"
HANDLERS = sorted((REPO_ROOT / "functions").glob("*/app.py"))

# What every layer may use: plain models, enums and infrastructure that know
# nothing of the tables (settings, logging, deadlines, the engine, AWS clients).
SHARED = {
    "content_retry",
    "content_retry.aws",
    "content_retry.concepts",
    "content_retry.content_types",
    "content_retry.costs",
    "content_retry.database",
    "content_retry.database.engine",
    "content_retry.deadlines",
    "content_retry.generated",
    "content_retry.generators.base",
    "content_retry.messages",
    "content_retry.observability",
    "content_retry.plan.models",
    "content_retry.settings",
    "content_retry.statuses",
    "content_retry.validation",
}
TABLES = "content_retry.tables"
REPOSITORIES = "content_retry.repositories"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The ``content_retry`` modules a file imports (``from a import b`` counts
    ``a.b`` when that is a module, else ``a``)."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] == "content_retry"}
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def _is_repository(name: str) -> bool:
    return name == REPOSITORIES or name.startswith(REPOSITORIES + ".")


def test_the_tables_import_only_shared_models() -> None:
    # GIVEN the schema's declaration
    imported = _graph()[TABLES]
    # THEN it knows nothing of who reads it
    assert imported <= SHARED, imported - SHARED


def test_repositories_import_only_tables_shared_models_and_each_other() -> None:
    # GIVEN every repository module
    repositories = {name: deps for name, deps in _graph().items() if _is_repository(name)}
    assert set(repositories) >= {
        f"{REPOSITORIES}.{name}"
        for name in ("claims", "tasks", "content_versions", "roadmaps", "quota")
    }
    # THEN none reaches up into a service
    for name, imported in repositories.items():
        wrong = {
            dep for dep in imported if dep not in SHARED | {TABLES} and not _is_repository(dep)
        }
        assert not wrong, f"{name} imports {sorted(wrong)}"


def test_shared_models_import_no_service_repository_or_table() -> None:
    graph = _graph()
    for name in SHARED:
        wrong = {dep for dep in graph[name] if dep not in SHARED}
        assert not wrong, f"{name} imports {sorted(wrong)}"


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda path: path.parent.name)
def test_handlers_reach_the_database_only_through_services(handler: Path) -> None:
    # GIVEN a Lambda handler
    imported = _imports(handler)
    source = handler.read_text()
    # THEN it imports no repository, no table and no SQLAlchemy
    assert not {dep for dep in imported if _is_repository(dep) or dep == TABLES}
    assert "sqlalchemy" not in source


def test_the_package_has_no_import_cycle() -> None:
    graph = _graph()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = [*visiting[visiting.index(name) :], name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        visiting.append(name)
        for dep in sorted(graph.get(name, ())):
            # A package's __init__ re-exporting its own modules is not a cycle.
            if not name.startswith(dep + "."):
                visit(dep)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
