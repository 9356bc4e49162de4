"""Where the project's own files are: template.yaml, functions/ and events/."""

from __future__ import annotations

from functools import cache
from pathlib import Path


class ProjectNotFoundError(RuntimeError):
    """No checkout of the project (template.yaml beside functions/) could be found."""


def _is_project(folder: Path) -> bool:
    return (folder / "template.yaml").is_file() and (folder / "functions").is_dir()


@cache
def project_root() -> Path:
    """The project's folder.

    Raises:
        ProjectNotFoundError: neither the current directory (nor one above it)
            nor this package's parent holds template.yaml and functions/.
    """
    here = Path.cwd().resolve()
    installed_from = Path(__file__).resolve().parent.parent
    for folder in (here, *here.parents, installed_from):
        if _is_project(folder):
            return folder
    raise ProjectNotFoundError(
        f"content-retry's local commands run from a checkout of the project: no template.yaml "
        f"beside a functions/ folder in {here}, its parents, or {installed_from}"
    )


def project_path(relative: str) -> Path:
    """A file of the project, e.g. ``project_path("events/api-retry.json")``."""
    return project_root() / relative
