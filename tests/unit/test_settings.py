from __future__ import annotations

import pytest

from content_retry.settings import Settings, SettingsError


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
