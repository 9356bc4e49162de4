"""The pipeline's configuration: one model, read from the environment once.

Nothing else in the package reads ``os.environ``; code that needs a setting
calls :func:`get_settings` (cached), and tests that change the environment call
``get_settings.cache_clear()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from content_retry.validation import describe_errors

DbAuth = Literal["iam", "secret"]
GeneratorName = Literal["template", "bedrock"]
# How the bedrock generator gets structured content: Converse tool use (the
# answer is checked against the content's JSON schema), or JSON in the text
# of the answer, for models without tool use.
BedrockOutput = Literal["tool_use", "text"]


class SettingsError(ValueError):
    """The environment does not describe a usable configuration."""


class Settings(BaseModel):
    """Environment variables of DESIGN §8, validated.

    Field aliases are the environment variable names.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    db_host: str | None = Field(default=None, alias="DB_HOST")
    db_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=5432, alias="DB_PORT")
    db_name: str | None = Field(default=None, alias="DB_NAME")
    db_user: str | None = Field(default=None, alias="DB_USER")
    db_auth: DbAuth | None = Field(default=None, alias="DB_AUTH")
    db_secret_arn: str | None = Field(default=None, alias="DB_SECRET_ARN")

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

    aws_region: str = Field(default="us-east-1", alias="AWS_REGION")
    aws_endpoint_url: str | None = Field(default=None, alias="AWS_ENDPOINT_URL")
    # botocore's own name for a service's endpoint: a local Bedrock beside moto.
    aws_endpoint_url_bedrock_runtime: str | None = Field(
        default=None, alias="AWS_ENDPOINT_URL_BEDROCK_RUNTIME"
    )

    @model_validator(mode="after")
    def _database_is_described(self) -> Settings:
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
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping.

        Raises:
            SettingsError: a variable holds a value that is not accepted; the
                message names the variable and what it accepts.
        """
        # Empty strings mean "unset", as they do for SAM parameters left blank.
        values = {key: value for key, value in environ.items() if value != ""}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(describe_errors(exc.errors(), whole="environment"))
            raise SettingsError(f"invalid configuration: {problems}") from exc

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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read from the environment on first use."""
    return Settings.from_environ(os.environ)
