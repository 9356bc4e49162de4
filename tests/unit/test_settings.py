from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from content_retry.settings import (
    DetectSettings,
    GenerateSettings,
    Settings,
    SettingsError,
    get_detect_settings,
    get_generate_settings,
    get_settings,
)
from functions.detect.app import lambda_handler as detect_handler
from functions.generate.app import lambda_handler as generate_handler
from tests.unit.test_template import function_environment

ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / "layers/common"
DATABASE = {"DATABASE_URL": "postgresql://localhost/x"}
DETECT = {**DATABASE, "RETRY_QUEUE_URL": "https://sqs/retry"}
GENERATE = {**DETECT, "RETRY_DLQ_URL": "https://sqs/retry-dlq"}


def test_defaults_for_a_local_run() -> None:
    settings = Settings.from_environ({"DATABASE_URL": "postgresql://localhost/x"})

    assert settings.content_generator == "template"
    assert settings.sweep_grace_minutes == 30
    assert settings.claim_lease_minutes == 60


def test_empty_values_count_as_unset() -> None:
    settings = Settings.from_environ({"BEDROCK_MODEL_ID": "", "DB_PORT": ""})

    assert settings.bedrock_model_id is None
    assert settings.db_port == 5432


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"CONTENT_GENERATOR": "gpt"}, "CONTENT_GENERATOR"),
        ({"DB_AUTH": "password"}, "DB_AUTH"),
        ({"DB_PORT": "70000"}, "DB_PORT"),
        ({"SWEEP_GRACE_MINUTES": "-1"}, "SWEEP_GRACE_MINUTES"),
        ({"DB_AUTH": "iam", "DB_HOST": "proxy"}, "DB_NAME, DB_USER"),
        ({"DB_AUTH": "secret", "DB_HOST": "h", "DB_NAME": "n", "DB_USER": "u"}, "DB_SECRET_ARN"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_environ(environ)


def test_require_names_the_missing_variable() -> None:
    with pytest.raises(SettingsError, match="RETRY_QUEUE_URL is not set"):
        Settings.from_environ({}).require("retry_queue_url")


def test_settings_built_with_values_hold_exactly_those(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a shell that sets a variable
    monkeypatch.setenv("SWEEP_GRACE_MINUTES", "5")

    # WHEN a test or a local tool builds settings with its own values
    settings = Settings(DATABASE_URL="postgresql://localhost/x")

    # THEN the shell does not leak into them
    assert settings.sweep_grace_minutes == 30


FunctionModel = type[DetectSettings] | type[GenerateSettings]


@pytest.mark.parametrize(
    ("model", "environ", "named"),
    [
        (DetectSettings, DATABASE, "RETRY_QUEUE_URL is not set"),
        (DetectSettings, {**DATABASE, "RETRY_QUEUE_URL": ""}, "RETRY_QUEUE_URL is not set"),
        (DetectSettings, {"RETRY_QUEUE_URL": "q"}, "DATABASE_URL is not set"),
        (GenerateSettings, DETECT, "RETRY_DLQ_URL is not set"),
        (GenerateSettings, {**DETECT, "RETRY_DLQ_URL": ""}, "RETRY_DLQ_URL is not set"),
        (GenerateSettings, {**DATABASE, "RETRY_DLQ_URL": "d"}, "RETRY_QUEUE_URL is not set"),
        (GenerateSettings, {**GENERATE, "DATABASE_URL": ""}, "DATABASE_URL is not set"),
        (GenerateSettings, {**GENERATE, "CONTENT_GENERATOR": "bedrock"}, "BEDROCK_MODEL_ID"),
        (
            GenerateSettings,
            {**GENERATE, "CONTENT_GENERATOR": "bedrock", "BEDROCK_MODEL_ID": ""},
            "BEDROCK_MODEL_ID",
        ),
    ],
)
def test_each_function_names_the_variable_it_misses(
    model: FunctionModel, environ: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=f"^invalid configuration: .*{named}"):
        model.from_environ(environ)


@pytest.mark.parametrize(
    ("model", "environ", "named"),
    [
        (
            DetectSettings,
            {**DETECT, "SWEEP_MAX_ROADMAPS": "0"},
            "SWEEP_MAX_ROADMAPS: .*greater than or equal to 1",
        ),
        (
            DetectSettings,
            {**DETECT, "CLAIM_LEASE_MINUTES": "an hour"},
            "CLAIM_LEASE_MINUTES: .*integer",
        ),
        (DetectSettings, {**DETECT, "DB_AUTH": "password"}, "DB_AUTH: .*'iam' or 'secret'"),
        (
            DetectSettings,
            {**DETECT, "LLM_PRICE_INPUT_USD_PER_MTOK": "-1"},
            "LLM_PRICE_INPUT_USD_PER_MTOK: .*greater than or equal to 0",
        ),
        (
            GenerateSettings,
            {**GENERATE, "GENERATE_PARALLELISM": "65"},
            "GENERATE_PARALLELISM: .*less than or equal to 64",
        ),
        (
            GenerateSettings,
            {**GENERATE, "CONTENT_GENERATOR": "gpt"},
            "CONTENT_GENERATOR: .*'template' or 'bedrock'",
        ),
        (
            GenerateSettings,
            {**GENERATE, "BEDROCK_OUTPUT": "json"},
            "BEDROCK_OUTPUT: .*'tool_use' or 'text'",
        ),
        (
            GenerateSettings,
            {**GENERATE, "RETRY_MAX_RECEIVE_COUNT": "0"},
            "RETRY_MAX_RECEIVE_COUNT: .*greater than or equal to 1",
        ),
        (
            GenerateSettings,
            {**GENERATE, "BEDROCK_MAX_TOKENS": "100"},
            "BEDROCK_MAX_TOKENS: .*greater than or equal to 256",
        ),
        (
            GenerateSettings,
            {**GENERATE, "LLM_QUOTA_TOKENS_PER_MINUTE": "many"},
            "LLM_QUOTA_TOKENS_PER_MINUTE: .*integer",
        ),
    ],
)
def test_each_function_names_a_bad_value_and_what_it_accepts(
    model: FunctionModel, environ: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=f"^invalid configuration: {named}"):
        model.from_environ(environ)


@pytest.mark.parametrize(
    ("model", "environ"),
    [
        (DetectSettings, {**DETECT, "SWEEP_GRACE_MINUTES": "", "RETRY_DLQ_URL": ""}),
        (GenerateSettings, {**GENERATE, "LLM_QUOTA_TOKENS_PER_MINUTE": "", "BEDROCK_MODEL_ID": ""}),
    ],
)
def test_each_function_takes_an_empty_variable_as_unset(
    model: FunctionModel, environ: dict[str, str]
) -> None:
    settings = model.from_environ(environ)

    assert settings.sweep_grace_minutes == 30
    assert settings.llm_quota_tokens_per_minute is None
    assert settings.bedrock_model_id is None


@pytest.mark.parametrize(
    ("model", "logical_id"),
    [(DetectSettings, "DetectFunction"), (GenerateSettings, "GenerateFunction")],
)
def test_the_deployed_environment_holds_what_each_function_needs(
    model: FunctionModel, logical_id: str
) -> None:
    settings = model.from_environ(function_environment(logical_id))

    assert settings.db_auth == "iam"
    assert settings.retry_queue_url


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A process environment with nothing of the pipeline's set; settings re-read."""
    for name in {field.alias for field in Settings.model_fields.values()}:
        if name:
            monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_the_process_environment_is_read_with_empty_values_unset(
    environment: pytest.MonkeyPatch,
) -> None:
    for name, value in {**GENERATE, "GENERATE_PARALLELISM": "3", "BEDROCK_MODEL_ID": ""}.items():
        environment.setenv(name, value)

    assert get_generate_settings().generate_parallelism == 3
    assert get_generate_settings().bedrock_model_id is None
    assert get_detect_settings().retry_queue_url == GENERATE["RETRY_QUEUE_URL"]


def test_the_generate_functions_first_invocation_without_a_dlq_names_it(
    environment: pytest.MonkeyPatch, lambda_context: Any
) -> None:
    # GIVEN a generate function deployed without RETRY_DLQ_URL
    for name, value in DETECT.items():
        environment.setenv(name, value)

    # WHEN its first invocation comes (no dependencies given: the function's own)
    # THEN it fails naming the variable, before touching a record
    with pytest.raises(SettingsError, match="RETRY_DLQ_URL is not set"):
        generate_handler({"Records": []}, lambda_context)


def test_the_detect_functions_first_invocation_without_a_queue_names_it(
    environment: pytest.MonkeyPatch, lambda_context: Any
) -> None:
    for name, value in DATABASE.items():
        environment.setenv(name, value)

    with pytest.raises(SettingsError, match="RETRY_QUEUE_URL is not set"):
        detect_handler({"action": "sweep"}, lambda_context)


NOTHING_READ = (
    "from content_retry.settings import get_settings\n"
    "assert get_settings.cache_info().currsize == 0, 'settings read at import'"
)


@pytest.mark.parametrize("function", ["detect", "generate"])
def test_a_handler_imports_with_no_variable_set(function: str) -> None:
    # GIVEN an environment without any of the pipeline's variables
    environment = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{LAYER}{os.pathsep}{ROOT}"}

    # WHEN the handler's module is imported (Lambda's init phase, a SnapStart snapshot)
    imported = subprocess.run(
        [sys.executable, "-c", f"import functions.{function}.app\n{NOTHING_READ}"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )

    # THEN nothing is read yet: the settings are checked on the first invocation
    assert imported.returncode == 0, imported.stderr
