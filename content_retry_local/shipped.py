"""What ships to Lambda, built by the deployed recipe and run the way Lambda runs it.

Used by the test of the handlers on the Lambda runtime and by benchmark B7.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from content_retry_local.project import project_path, project_root

FUNCTIONS = ("detect", "generate")
# 1980-01-01T00:00:00Z, the earliest date a zip entry can hold: what SAM writes.
ZIP_EPOCH = 315_532_800


class ShippedBuildError(RuntimeError):
    """The layer could not be built (no Python 3.12, or the recipe failed)."""


def find_python312() -> str | None:
    """A Python 3.12 interpreter (Lambda's runtime) on this machine, or None.

    The same search the Makefiles use (``layers/common/find-python3.12``):
    ``$PYTHON312``, ``python3.12`` on PATH, pyenv's installed 3.12 releases.
    """
    finder = project_path("layers/common/find-python3.12")
    completed = subprocess.run(  # noqa: S603 - the project's own script
        [str(finder)], capture_output=True, text=True, check=False
    )
    found = completed.stdout.strip()
    return found if completed.returncode == 0 and found else None


@dataclass(frozen=True)
class ShippedTree:
    """A built layer and the functions' folders, as Lambda would unpack them."""

    root: Path
    python312: str

    @property
    def layer(self) -> Path:
        """What Lambda unpacks to /opt/python."""
        return self.root / "layer" / "python"

    def function(self, name: str) -> Path:
        """What Lambda unpacks to /var/task for ``name``."""
        return self.root / "functions" / name


def build_shipped_tree(root: Path, *, python312: str, arch: str = "x86_64") -> ShippedTree:
    """Build the layer with the deployed recipe and copy the functions beside it.

    Args:
        root: an empty or absent folder to build into.
        python312: the Python 3.12 that builds (and later runs) it.
        arch: ``x86_64`` to run it on this machine, ``aarch64`` as deployed.

    Raises:
        ShippedBuildError: the recipe failed; the message holds its output.
    """
    tree = ShippedTree(root, python312)
    completed = subprocess.run(  # noqa: S603 - make, on the project's own Makefile
        [  # noqa: S607 - make is found on PATH, as sam build finds it
            "make",
            "--no-print-directory",
            "-C",
            str(project_path("layers/common")),
            "build-CommonLayer",
            f"ARTIFACTS_DIR={root / 'layer'}",
            f"ARCH={arch}",
            f"PYTHON312={python312}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise ShippedBuildError(
            f"make build-CommonLayer failed:\n{completed.stdout}\n{completed.stderr}"
        )
    for name in FUNCTIONS:
        # SAM's Python builder copies the function's folder as it is (no bytecode).
        shutil.copytree(
            project_root() / "functions" / name,
            tree.function(name),
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return tree


def freeze(root: Path) -> None:
    """Date every file and folder 1980-01-01 and make the tree read-only."""
    for folder, _folders, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            os.utime(path, (ZIP_EPOCH, ZIP_EPOCH), follow_symlinks=False)
            path.chmod(0o444)
        os.utime(folder, (ZIP_EPOCH, ZIP_EPOCH))
        Path(folder).chmod(0o555)


def thaw(root: Path) -> None:
    """Make a frozen tree writable again (so it can be removed)."""
    for folder, _folders, files in os.walk(root):
        Path(folder).chmod(0o755)
        for name in files:
            Path(folder, name).chmod(0o644)


# Runs in the Lambda-like interpreter: sys.path is what -I -S leaves (the
# standard library) with the function's folder and the layer put first, as
# Lambda's bootstrap does (/var/task, /opt/python, the runtime's library).
_PROBE = """
import json, sys, time
function_dir, layer_dir, event_path = sys.argv[1:4]
standard_library = list(sys.path)
sys.path[:0] = [function_dir, layer_dir]

class Context:
    function_name = "content-retry-shipped"
    memory_limit_in_mb = 512
    invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:content-retry-shipped"
    aws_request_id = "00000000-0000-4000-8000-000000000000"
    def get_remaining_time_in_millis(self):
        return 300000

started = time.perf_counter()
import app
import_seconds = time.perf_counter() - started
result = None
if event_path != "-":
    with open(event_path) as file:
        result = app.lambda_handler(json.load(file), Context())

def origin(module):
    path = getattr(module, "__file__", None)
    if not path:
        return "builtin"
    if path.startswith(function_dir + "/"):
        return "function"
    if path.startswith(layer_dir + "/"):
        return "layer"
    if "/site-packages/" not in path and any(path.startswith(p + "/") for p in standard_library):
        return "stdlib"
    return "foreign"

origins = {name: origin(module) for name, module in list(sys.modules.items())}
print("SHIPPED-RESULT " + json.dumps({
    "result": result,
    "import_seconds": import_seconds,
    "foreign": sorted(
        f"{name}: {sys.modules[name].__file__}" for name, where in origins.items()
        if where == "foreign"
    ),
    "layer_modules": sorted(
        sys.modules[name].__file__ for name, where in origins.items() if where == "layer"
    ),
    "sys_path": sys.path,
}))
"""


@dataclass(frozen=True)
class HandlerRun:
    result: Any
    import_seconds: float
    foreign_modules: list[str]
    layer_modules: list[str]
    sys_path: list[str]
    output: str


def run_handler(
    tree: ShippedTree,
    function: str,
    event_path: Path | None,
    environment: Mapping[str, str],
    *,
    flags: tuple[str, ...] = ("-I", "-S", "-B"),
) -> HandlerRun:
    """Import one handler (and invoke it on an event, if given) as Lambda would.

    Args:
        event_path: the event's JSON file; None only imports the handler.
        environment: the process's whole environment (the functions' variables).
        flags: the interpreter's flags; Lambda's read-only code folders are
            ``-B`` (no bytecode can be written there).

    Raises:
        subprocess.CalledProcessError: the handler raised or the process failed.
    """
    completed = subprocess.run(  # noqa: S603 - the project's own probe, on Python 3.12
        [
            tree.python312,
            *flags,
            "-c",
            _PROBE,
            str(tree.function(function)),
            str(tree.layer),
            str(event_path) if event_path else "-",
        ],
        cwd=tree.function(function),
        env=dict(environment),
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(
        line for line in reversed(completed.stdout.splitlines()) if line.startswith("SHIPPED-")
    )
    report = json.loads(line.removeprefix("SHIPPED-RESULT "))
    return HandlerRun(
        result=report["result"],
        import_seconds=report["import_seconds"],
        foreign_modules=report["foreign"],
        layer_modules=report["layer_modules"],
        sys_path=report["sys_path"],
        output=completed.stdout + completed.stderr,
    )


def lambda_environment(function: str, tree: ShippedTree, **variables: str) -> dict[str, str]:
    """The variables Lambda sets for a function, plus ``variables`` (the
    function's own configuration)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
        "LAMBDA_TASK_ROOT": str(tree.function(function)),
        "AWS_LAMBDA_FUNCTION_NAME": f"content-retry-{function}",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        **variables,
    }
