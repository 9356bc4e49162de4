"""The LLM quota as a pool shared by every generate container (DESIGN §12).

Bedrock's on-demand quota is tokens and requests per minute for the whole
account and model, and a call reserves its input tokens plus ``maxTokens``
when it starts. Each container pacing itself alone overruns it together, so
the pace is one token bucket row per model in PostgreSQL
(``llm_quota_buckets``), taken with one statement under the row's lock.

The bucket's rate is the configured quota when one is given (its ceiling);
without one it starts at a generous guess. Either way a throttle Bedrock
still reports cuts the rate (multiplicative decrease, at most every few
seconds) and a calm minute raises it slowly back (additive, toward the
ceiling): the pace learns the quota that is really there.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text

from content_retry.database import BatchConnection
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

_TAKE = text(
    """
WITH p AS (
  SELECT CAST(:wanted AS integer) AS wanted, CAST(:per_call AS float8) AS per_call,
         CAST(:throttled AS boolean) AS throttled, CAST(:cut_to AS float8) AS cut_to,
         CAST(:recovery AS float8) AS recovery, CAST(:ceiling_tpm AS float8) AS ceiling_tpm,
         CAST(:ceiling_rpm AS float8) AS ceiling_rpm,
         clock_timestamp() - make_interval(secs => CAST(:cooldown AS float8)) AS cooled_since,
         clock_timestamp() - make_interval(secs => CAST(:calm AS float8)) AS calm_since
),
bucket AS (
  SELECT b.model_id, b.tokens_per_minute AS tpm, b.requests_per_minute AS rpm, b.tokens,
         b.requests, greatest(extract(epoch FROM clock_timestamp() - b.refilled_at), 0) AS elapsed,
         p.throttled AND (b.throttled_at IS NULL OR b.throttled_at < p.cooled_since) AS cut,
         b.throttled_at IS NULL OR b.throttled_at < p.calm_since AS calm
  FROM llm_quota_buckets AS b, p WHERE b.model_id = :model_id
  FOR UPDATE OF b
),
rates AS (
  SELECT b.*,
    CASE WHEN b.cut THEN greatest(p.per_call, b.tpm * p.cut_to)
         WHEN b.calm THEN least(p.ceiling_tpm, b.tpm * (1 + p.recovery * least(b.elapsed, 60) / 60))
         ELSE least(p.ceiling_tpm, b.tpm) END AS new_tpm,
    CASE WHEN b.cut THEN greatest(1, b.rpm * p.cut_to)
         WHEN b.calm THEN least(p.ceiling_rpm, b.rpm * (1 + p.recovery * least(b.elapsed, 60) / 60))
         ELSE least(p.ceiling_rpm, b.rpm) END AS new_rpm
  FROM bucket AS b, p
),
available AS (
  SELECT r.*,
    CASE WHEN r.cut THEN least(r.tokens, 0)
         ELSE least(r.new_tpm, r.tokens + r.new_tpm * r.elapsed / 60) END AS tokens_now,
    CASE WHEN r.cut THEN least(r.requests, 0)
         ELSE least(r.new_rpm, r.requests + r.new_rpm * r.elapsed / 60) END AS requests_now
  FROM rates AS r
),
granted AS (
  SELECT a.*,
    greatest(0, least(p.wanted, floor(a.tokens_now / p.per_call), floor(a.requests_now)))::integer
      AS calls
  FROM available AS a, p
)
UPDATE llm_quota_buckets AS q
SET tokens_per_minute = g.new_tpm, requests_per_minute = g.new_rpm,
    tokens = g.tokens_now - g.calls * p.per_call, requests = g.requests_now - g.calls,
    refilled_at = clock_timestamp(),
    throttled_at = CASE WHEN g.cut THEN clock_timestamp() ELSE q.throttled_at END
FROM granted AS g, p
WHERE q.model_id = g.model_id
RETURNING g.calls, q.tokens, q.requests, q.tokens_per_minute, q.requests_per_minute
"""
)

_CREATE = text(
    "INSERT INTO llm_quota_buckets "
    "(model_id, tokens_per_minute, requests_per_minute, tokens, requests) "
    "VALUES (:model_id, CAST(:tpm AS float8), CAST(:rpm AS float8), CAST(:tpm AS float8), "
    "CAST(:rpm AS float8)) ON CONFLICT (model_id) DO NOTHING"
)


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
    params = {
        "model_id": quota.model_id,
        "wanted": calls,
        "per_call": float(max(tokens_per_call, 1)),
        "throttled": throttled,
        "cooldown": THROTTLE_COOLDOWN_SECONDS,
        "calm": CALM_SECONDS,
        "cut_to": THROTTLE_CUT,
        "recovery": RECOVERY_PER_MINUTE,
        # Learning, the pace never grows past its guess: a rate nobody throttled
        # says nothing about the quota above it.
        "ceiling_tpm": float(quota.tokens_per_minute or GUESSED_TOKENS_PER_MINUTE),
        "ceiling_rpm": float(quota.requests_per_minute or GUESSED_REQUESTS_PER_MINUTE),
    }
    row = connection.execute(_TAKE, params).one_or_none()
    if row is None:
        connection.execute(
            _CREATE,
            {
                "model_id": quota.model_id,
                "tpm": float(quota.tokens_per_minute or GUESSED_TOKENS_PER_MINUTE),
                "rpm": float(quota.requests_per_minute or GUESSED_REQUESTS_PER_MINUTE),
            },
        )
        row = connection.execute(_TAKE, params).one()
    granted, tokens, requests, tpm, rpm = row
    per_call = params["per_call"]
    # Until one more call fits: the tokens and the request it lacks, at the refill rates.
    waits = [
        (per_call - tokens) / (tpm / 60) if tokens < per_call else 0.0,
        (1 - requests) / (rpm / 60) if requests < 1 else 0.0,
    ]
    return Grant(granted, max(waits), tpm, rpm)


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
