"""The LLM quota as a pool shared by every generate container (DESIGN §12): one
token bucket per model (``repositories.quota``), at the configured quota or a
guess, cut by a throttle and raised back after a calm minute."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection

from content_retry.database import BatchConnection
from content_retry.repositories.quota import Pace, Take, create_bucket, take_calls
from content_retry.settings import Settings

# Without a configured quota, the pace starts here and learns down from throttles.
GUESSED_TOKENS_PER_MINUTE = 1_000_000
GUESSED_REQUESTS_PER_MINUTE = 1_000
# A throttle cuts the rate to this share, at most once per THROTTLE_COOLDOWN_SECONDS:
# the throttles of calls already reserved before a cut say nothing new, and a
# second cut for them would pace below the quota for minutes (B9).
THROTTLE_CUT = 0.8
THROTTLE_COOLDOWN_SECONDS = 15
# After a minute without throttles the rate grows this share per minute.
RECOVERY_PER_MINUTE = 0.05
CALM_SECONDS = 60


@dataclass(frozen=True)
class Quota:
    """The account's quota for one model, as configured (None: learn it)."""

    model_id: str
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None


@dataclass(frozen=True)
class Grant:
    """What a take gave: how many calls may start now, and when to ask again."""

    calls: int
    retry_after_seconds: float
    tokens_per_minute: float = 0.0
    requests_per_minute: float = 0.0


class DatabasePacer:
    """The shared quota as generation takes it: each grant one short transaction
    on the batch's connection (so a failed database stops the calls too)."""

    def __init__(self, database: BatchConnection, quota: Quota) -> None:
        self._database = database
        self._quota = quota

    def grant(self, calls: int, tokens_per_call: int, *, throttled: bool) -> Grant:
        with self._database.transaction() as connection:
            return take(
                connection,
                self._quota,
                calls=calls,
                tokens_per_call=tokens_per_call,
                throttled=throttled,
            )


def take(
    connection: Connection,
    quota: Quota,
    *,
    calls: int,
    tokens_per_call: int,
    throttled: bool = False,
) -> Grant:
    """Take up to ``calls`` calls of ``tokens_per_call`` reserved tokens each
    from the model's bucket, in the caller's transaction.

    Args:
        throttled: Bedrock throttled a call since this container's last take;
            the bucket's rate is cut for every container.
    """
    # Learning, the pace never grows past its guess: a rate nobody throttled
    # says nothing about the quota above it.
    ceiling_tpm = float(quota.tokens_per_minute or GUESSED_TOKENS_PER_MINUTE)
    ceiling_rpm = float(quota.requests_per_minute or GUESSED_REQUESTS_PER_MINUTE)
    pace = Pace(
        throttle_cut=THROTTLE_CUT,
        throttle_cooldown=timedelta(seconds=THROTTLE_COOLDOWN_SECONDS),
        recovery_per_minute=RECOVERY_PER_MINUTE,
        calm=timedelta(seconds=CALM_SECONDS),
        ceiling_tokens_per_minute=ceiling_tpm,
        ceiling_requests_per_minute=ceiling_rpm,
    )
    per_call = float(max(tokens_per_call, 1))

    def take_now() -> Take | None:
        return take_calls(
            connection,
            quota.model_id,
            calls=calls,
            tokens_per_call=per_call,
            throttled=throttled,
            pace=pace,
        )

    taken = take_now()
    if taken is None:
        create_bucket(
            connection,
            quota.model_id,
            tokens_per_minute=ceiling_tpm,
            requests_per_minute=ceiling_rpm,
        )
        taken = take_now()
        if taken is None:  # pragma: no cover - created just now, in this transaction
            raise LookupError(f"no quota bucket for {quota.model_id}")
    # Until one more call fits: the tokens and the request it lacks, at the refill rates.
    tokens, requests = taken.tokens, taken.requests
    tpm, rpm = taken.tokens_per_minute, taken.requests_per_minute
    waits = [
        (per_call - tokens) / (tpm / 60) if tokens < per_call else 0.0,
        (1 - requests) / (rpm / 60) if requests < 1 else 0.0,
    ]
    return Grant(taken.calls, max(waits), tpm, rpm)


def pacer_for(
    generator: object, database: BatchConnection, settings: Settings
) -> DatabasePacer | None:
    """The shared pace for a generator that calls a metered model (one that
    names its ``model_id``); None for one that calls nothing (the template)."""
    model_id = getattr(generator, "model_id", None)
    if not isinstance(model_id, str):
        return None
    quota = Quota(
        model_id, settings.llm_quota_tokens_per_minute, settings.llm_quota_requests_per_minute
    )
    return DatabasePacer(database, quota)
