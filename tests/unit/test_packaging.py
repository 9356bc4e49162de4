"""The Lambda layer ships exactly the project's runtime dependencies."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _requirements(lines: list[str]) -> list[str]:
    return sorted(
        line.replace(" ", "") for line in lines if line.strip() and not line.startswith("#")
    )


def test_layer_requirements_match_pyproject_runtime_dependencies() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    layer = (REPO_ROOT / "layers/common/requirements.txt").read_text().splitlines()

    assert _requirements(layer) == _requirements(pyproject["project"]["dependencies"])


def test_the_package_lives_in_the_layer() -> None:
    import content_retry

    assert (
        Path(content_retry.__file__).resolve().parent == REPO_ROOT / "layers/common/content_retry"
    )
