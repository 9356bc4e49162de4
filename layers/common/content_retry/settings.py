"""The pipeline's configuration (DESIGN §8), read from the environment with pydantic-settings.

:func:`get_settings` reads the environment once per process; each function checks
on first use that it holds what that function needs (:func:`get_detect_settings`,
:func:`get_generate_settings`). Nothing else reads ``os.environ``.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal, Self

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from content_retry.validation import describe_errors

DbAuth = Literal["iam", "secret"]
GeneratorName = Literal["template", "bedrock"]
# How the bedrock generator gets structured content: Converse tool use (the
# answer is checked against the content's JSON schema), or JSON in the text
# of the answer, for models without tool use.
BedrockOutput = Literal["tool_use", "text"]


class SettingsError(ValueError):
    """The environment does not describe a usable configuration."""


class SharedSettings(BaseSettings):
    """What every function shares: the database and AWS.

    Field aliases are the environment variable names; an empty variable is unset.
    Built with values (``Settings(DATABASE_URL=...)``), a model holds exactly those;
    :meth:`from_environ` reads an environment.
    """

    model_config = SettingsConfigDict(
        frozen=True,
        populate_by_name=True,
        extra="ignore",
        case_sensitive=True,
        env_ignore_empty=True,
    )

    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    db_host: str | None = Field(default=None, alias="DB_HOST")
    db_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=5432, alias="DB_PORT")
    db_name: str | None = Field(default=None, alias="DB_NAME")
    db_user: str | None = Field(default=None, alias="DB_USER")
    db_auth: DbAuth | None = Field(default=None, alias="DB_AUTH")
    db_secret_arn: str | None = Field(default=None, alias="DB_SECRET_ARN")

    aws_region: str = Field(default="us-east-1", alias="AWS_REGION")
    aws_endpoint_url: str | None = Field(default=None, alias="AWS_ENDPOINT_URL")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Values given to the constructor are the whole configuration (tests and
        # local tools never depend on the shell's environment by accident).
        return (init_settings,)

    @model_validator(mode="after")
    def _database_is_described(self) -> Self:
        if self.database_url or not self.db_auth:
            return self
        missing = [
            name
            for name, value in (
                ("DB_HOST", self.db_host),
                ("DB_NAME", self.db_name),
                ("DB_USER", self.db_user),
            )
            if not value
        ]
        if self.db_auth == "secret" and not self.db_secret_arn:
            missing.append("DB_SECRET_ARN")
        if missing:
            raise ValueError(f"DB_AUTH={self.db_auth} also needs {', '.join(missing)}")
        return self

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Self:
        """The settings an environment describes: ``environ``, or the process's own
        (read by pydantic-settings). An empty variable is unset.

        Raises:
            SettingsError: a variable is missing, or holds a value that is not
                accepted; the message names the variable and what it accepts.
        """
        if environ is None:
            values: Mapping[str, Any] = EnvSettingsSource(cls)()
        else:
            values = {key: value for key, value in environ.items() if value != ""}
        return cls._validated(values)

    @classmethod
    def _validated(cls, values: Mapping[str, Any]) -> Self:
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise SettingsError(f"invalid configuration: {_problems(exc)}") from exc

    def require(self, name: str) -> str:
        """Return a setting that this code path cannot run without.

        Raises:
            SettingsError: the setting is unset; the message names its variable.
        """
        value = getattr(self, name)
        if not value:
            alias = type(self).model_fields[name].alias or name.upper()
            raise SettingsError(f"{alias} is not set")
        return str(value)


def _problems(exc: ValidationError) -> str:
    """``variable: what it accepts`` per error; an unset variable as ``NAME is not set``."""
    lines = []
    for error in exc.errors()[:10]:
        if error["type"] == "missing" and error["loc"]:
            lines.append(f"{error['loc'][0]} is not set")
        elif error["type"] == "value_error" and not error["loc"]:
            lines.append(str(error["ctx"]["error"]))  # a rule over several variables
        else:
            lines.extend(describe_errors([error], whole="environment"))
    return "; ".join(lines)


class Settings(SharedSettings):
    """Every variable of DESIGN §8, none required: what local tools and tests build."""

    retry_queue_url: str | None = Field(default=None, alias="RETRY_QUEUE_URL")
    retry_dlq_url: str | None = Field(default=None, alias="RETRY_DLQ_URL")

    content_generator: GeneratorName = Field(default="template", alias="CONTENT_GENERATOR")
    bedrock_model_id: str | None = Field(default=None, alias="BEDROCK_MODEL_ID")
    bedrock_output: BedrockOutput = Field(default="tool_use", alias="BEDROCK_OUTPUT")
    # The retry queue's RedrivePolicy maxReceiveCount: on a record's last delivery
    # the worker dead-letters it itself, with its reason, instead of failing it
    # back for SQS to move without one.
    max_receive_count: Annotated[int, Field(ge=1, le=1000)] = Field(
        default=5, alias="RETRY_MAX_RECEIVE_COUNT"
    )
    # LLM calls one generate invocation runs at once (1: one after another, in
    # the batch's order); the Bedrock client's connection pool is sized to it.
    generate_parallelism: Annotated[int, Field(ge=1, le=64)] = Field(
        default=8, alias="GENERATE_PARALLELISM"
    )

    sweep_grace_minutes: Annotated[int, Field(ge=0)] = Field(
        default=30, alias="SWEEP_GRACE_MINUTES"
    )
    # The most roadmaps one sweep may take on; it plans as many of them as its
    # invocation's time allows (SWEEP_RESERVE_SECONDS are kept for the rest).
    sweep_max_roadmaps: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=10_000, alias="SWEEP_MAX_ROADMAPS"
    )
    sweep_reserve_seconds: Annotated[int, Field(ge=1, le=600)] = Field(
        default=10, alias="SWEEP_RESERVE_SECONDS"
    )
    # How long a planned item whose message was never sent stays claimed: it
    # bounds how long a crash between commit and send delays a retry. An item
    # whose message was sent stays claimed while the message can still be in
    # the queue (RETRY_QUEUE_RETENTION_MINUTES), however deep the backlog.
    claim_lease_minutes: Annotated[int, Field(ge=1)] = Field(
        default=60, alias="CLAIM_LEASE_MINUTES"
    )
    # The dead-letter queue's MessageRetentionPeriod, in minutes: an item whose
    # generated content waits there stays claimed that long (a test holds them equal).
    dlq_retention_minutes: Annotated[int, Field(ge=1, le=20_160)] = Field(
        default=20_160, alias="RETRY_DLQ_RETENTION_MINUTES"
    )
    # The retry queue's MessageRetentionPeriod, in minutes (a test holds them equal).
    queue_retention_minutes: Annotated[int, Field(ge=1, le=20_160)] = Field(
        default=5_760, alias="RETRY_QUEUE_RETENTION_MINUTES"
    )

    # The most one LLM call may take, botocore's retries included, and the save
    # after it (at least aws.BEDROCK_WORST_CASE_SECONDS + aws.SAVE_RESERVE_SECONDS):
    # the generate function starts no call with less time than this left.
    llm_call_budget_seconds: Annotated[int, Field(ge=1, le=900)] = Field(
        default=180, alias="LLM_CALL_BUDGET_SECONDS"
    )

    # The account's Bedrock on-demand quota for the model, when known (Service
    # Quotas: tokens and requests per minute). Every generate container together
    # stays within it (content_retry.pacing); unset, the pacing learns the
    # quota from throttles.
    llm_quota_tokens_per_minute: Annotated[int | None, Field(ge=1)] = Field(
        default=None, alias="LLM_QUOTA_TOKENS_PER_MINUTE"
    )
    llm_quota_requests_per_minute: Annotated[int | None, Field(ge=1)] = Field(
        default=None, alias="LLM_QUOTA_REQUESTS_PER_MINUTE"
    )
    # Output tokens one Converse call may produce (inferenceConfig.maxTokens);
    # an answer cut at it is tried once more with twice as many.
    bedrock_max_tokens: Annotated[int, Field(ge=256, le=64_000)] = Field(
        default=4096, alias="BEDROCK_MAX_TOKENS"
    )

    # What the retry plan's estimate prices a call at: the model's on-demand
    # prices in US dollars per million tokens (the defaults: Claude 3.5 Haiku's).
    llm_price_input_usd_per_mtok: Annotated[float, Field(ge=0)] = Field(
        default=0.8, alias="LLM_PRICE_INPUT_USD_PER_MTOK"
    )
    llm_price_output_usd_per_mtok: Annotated[float, Field(ge=0)] = Field(
        default=4.0, alias="LLM_PRICE_OUTPUT_USD_PER_MTOK"
    )

    # botocore's own name for a service's endpoint: a local Bedrock beside moto.
    aws_endpoint_url_bedrock_runtime: str | None = Field(
        default=None, alias="AWS_ENDPOINT_URL_BEDROCK_RUNTIME"
    )

    @classmethod
    def of(cls, settings: Settings) -> Self:
        """``settings``' values, checked against this model's requirements.

        Raises:
            SettingsError: as :meth:`from_environ`.
        """
        return cls._validated(settings.model_dump(exclude_unset=True))


class _FunctionSettings(Settings):
    """What a deployed function needs whatever it does: a database."""

    @model_validator(mode="after")
    def _database_is_given(self) -> Self:
        if not (self.database_url or self.db_auth):
            raise ValueError(
                "DATABASE_URL is not set (nor DB_AUTH=iam|secret with DB_HOST, DB_NAME, DB_USER)"
            )
        return self


class DetectSettings(_FunctionSettings):
    """The detect function's settings: it plans retries and sends their messages."""

    retry_queue_url: str = Field(alias="RETRY_QUEUE_URL")


class GenerateSettings(_FunctionSettings):
    """The generate function's settings: it generates, saves, returns records
    to the retry queue and dead-letters what it cannot save."""

    retry_queue_url: str = Field(alias="RETRY_QUEUE_URL")
    retry_dlq_url: str = Field(alias="RETRY_DLQ_URL")

    @model_validator(mode="after")
    def _model_is_named(self) -> Self:
        if self.content_generator == "bedrock" and not self.bedrock_model_id:
            raise ValueError("BEDROCK_MODEL_ID is not set (CONTENT_GENERATOR=bedrock needs it)")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read from the environment on first use.

    Tests that change the environment call ``get_settings.cache_clear()``.
    """
    return Settings.from_environ()


@lru_cache(maxsize=1)
def _detect_settings(settings: Settings) -> DetectSettings:
    return DetectSettings.of(settings)


@lru_cache(maxsize=1)
def _generate_settings(settings: Settings) -> GenerateSettings:
    return GenerateSettings.of(settings)


def get_detect_settings() -> DetectSettings:
    """The process's settings, checked on first use to hold what detect needs.

    Raises:
        SettingsError: a variable detect needs is unset or invalid (named).
    """
    return _detect_settings(get_settings())


def get_generate_settings() -> GenerateSettings:
    """The process's settings, checked on first use to hold what generate needs.

    Raises:
        SettingsError: a variable generate needs is unset or invalid (named).
    """
    return _generate_settings(get_settings())
