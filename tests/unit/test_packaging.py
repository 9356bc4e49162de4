"""What ships to Lambda: the runtime package alone, with exactly the locked dependencies."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[2]
LAYER = REPO_ROOT / "layers/common"
LOCK = LAYER / "requirements.lock"
PYPROJECT_SOURCE = "content-retry (pyproject.toml)"


def locked_packages() -> dict[str, tuple[str, set[str], int]]:
    """The lock's entries: name -> (version, what required it, number of hashes)."""
    packages: dict[str, tuple[str, set[str], int]] = {}
    name = ""
    via_block = False
    for line in LOCK.read_text().splitlines():
        stripped = line.strip()
        if line and line[0].isalnum():
            requirement = line.split()[0]
            name = canonicalize_name(requirement.split("==")[0])
            packages[name] = (requirement.split("==")[1], set(), 0)
            via_block = False
        elif stripped.startswith("--hash=") and name:
            version, via, hashes = packages[name]
            packages[name] = (version, via, hashes + 1)
        elif stripped.startswith("# via"):
            rest = stripped.removeprefix("# via").strip()
            via_block = not rest
            if rest:
                packages[name][1].add(rest)
        elif via_block and stripped.startswith("#"):
            packages[name][1].add(stripped.removeprefix("#").strip())
    return packages


def runtime_requirements() -> list[Requirement]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return [Requirement(item) for item in pyproject["project"]["dependencies"]]


def test_the_lock_pins_every_runtime_dependency_within_its_range() -> None:
    locked = locked_packages()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in the lock: run `make lock`"
        version = locked[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"the lock pins {name}=={version}, outside pyproject's {requirement}: run `make lock`"
        )


def test_the_lock_holds_nothing_pyproject_no_longer_asks_for() -> None:
    declared = {canonicalize_name(requirement.name) for requirement in runtime_requirements()}
    locked = locked_packages()
    direct = {name for name, (_, via, _) in locked.items() if PYPROJECT_SOURCE in via}
    assert direct == declared, "the lock and pyproject.toml disagree: run `make lock`"
    for name, (_, via, _) in locked.items():
        assert via, f"{name} is locked but nothing requires it: run `make lock`"


def test_every_locked_package_is_pinned_with_hashes() -> None:
    locked = locked_packages()
    assert locked
    for name, (version, _, hashes) in locked.items():
        assert hashes >= 1, f"{name}=={version} has no hash"


def _imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


RUNTIME_FILES = sorted((LAYER / "content_retry").rglob("*.py")) + sorted(
    (REPO_ROOT / "functions").rglob("*.py")
)


@pytest.mark.parametrize("path", RUNTIME_FILES, ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_the_runtime_never_imports_the_local_tooling(path: Path) -> None:
    tooling = {name for name in _imports(path) if name.split(".")[0] == "content_retry_local"}
    assert not tooling, f"{path} imports local tooling: {sorted(tooling)}"
    # Nor by name at run time (importlib, __import__).
    assert "content_retry_local" not in path.read_text()


def test_the_layer_folder_holds_the_package_and_its_build_recipe_only() -> None:
    kept = {path.name for path in LAYER.iterdir() if path.name != "__pycache__"}
    assert kept == {"content_retry", "Makefile", "requirements.lock", "find-python3.12"}


def test_the_package_lives_in_the_layer() -> None:
    import content_retry

    assert Path(content_retry.__file__).resolve().parent == LAYER / "content_retry"
