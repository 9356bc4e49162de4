"""The LLM quota's token buckets: ``llm_quota_buckets``, one row per model (DESIGN §12)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import cache

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Connection,
    Integer,
    Interval,
    Text,
    and_,
    bindparam,
    case,
    cast,
    extract,
    func,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import DOUBLE_PRECISION, insert
from sqlalchemy.sql.dml import ReturningUpdate

from content_retry.tables import llm_quota_buckets


@dataclass(frozen=True)
class Pace:
    """How a take changes a bucket's rates (the pacing's rules, in its units)."""

    # A throttle cuts both rates to this share, at most once per cooldown.
    throttle_cut: float
    throttle_cooldown: timedelta
    # After ``calm`` without throttles the rates grow this share per minute,
    # never past the ceilings.
    recovery_per_minute: float
    calm: timedelta
    ceiling_tokens_per_minute: float
    ceiling_requests_per_minute: float


@dataclass(frozen=True)
class Take:
    """What a take granted, and the bucket as it left it."""

    calls: int
    tokens: float
    requests: float
    tokens_per_minute: float
    requests_per_minute: float


def _number(name: str) -> ColumnElement[float]:
    return cast(bindparam(name, type_=DOUBLE_PRECISION), DOUBLE_PRECISION)


@cache
def _take_statement() -> ReturningUpdate[int, float, float, float, float]:
    """One statement: refill the model's bucket under its row lock, apply a
    throttle's cut or a calm minute's recovery, grant what fits, keep the rest."""
    # Bound values are named unlike the table's columns: SQLAlchemy would add a
    # SET clause for a parameter named like one.
    p = select(
        cast(bindparam("wanted", type_=Integer), Integer).label("wanted"),
        _number("per_call").label("per_call"),
        cast(bindparam("throttled", type_=Boolean), Boolean).label("throttled"),
        _number("cut_to").label("cut_to"),
        _number("recovery").label("recovery"),
        _number("ceiling_tpm").label("ceiling_tpm"),
        _number("ceiling_rpm").label("ceiling_rpm"),
        (func.clock_timestamp() - bindparam("cooldown", type_=Interval)).label("cooled_since"),
        (func.clock_timestamp() - bindparam("calm", type_=Interval)).label("calm_since"),
    ).cte("p")

    b = llm_quota_buckets.alias("b")
    # No throttle recorded since the cooldown (a new throttle may cut), or since a calm minute.
    cooled_down = or_(b.c.throttled_at.is_(None), b.c.throttled_at < p.c.cooled_since)
    calm = or_(b.c.throttled_at.is_(None), b.c.throttled_at < p.c.calm_since)
    bucket = (
        select(
            b.c.model_id,
            b.c.tokens_per_minute.label("tpm"),
            b.c.requests_per_minute.label("rpm"),
            b.c.tokens,
            b.c.requests,
            func.greatest(
                extract("epoch", func.clock_timestamp() - b.c.refilled_at),
                0.0,
                type_=DOUBLE_PRECISION,
            ).label("elapsed"),
            and_(p.c.throttled, cooled_down).label("cut"),
            calm.label("calm"),
        )
        .select_from(b.join(p, true()))
        .where(b.c.model_id == bindparam("model", type_=Text))
        .with_for_update(of=b)
        .cte("bucket")
    )

    def new_rate(
        rate: ColumnElement[float],
        ceiling: ColumnElement[float],
        floor: ColumnElement[float] | float,
    ) -> ColumnElement[float]:
        recovered = rate * (1.0 + p.c.recovery * func.least(bucket.c.elapsed, 60.0) / 60.0)
        return case(
            (bucket.c.cut, func.greatest(floor, rate * p.c.cut_to)),
            (bucket.c.calm, func.least(ceiling, recovered)),
            else_=func.least(ceiling, rate),
        )

    rates = (
        select(
            bucket,
            new_rate(bucket.c.tpm, p.c.ceiling_tpm, p.c.per_call).label("new_tpm"),
            new_rate(bucket.c.rpm, p.c.ceiling_rpm, 1.0).label("new_rpm"),
        )
        .select_from(bucket.join(p, true()))
        .cte("rates")
    )

    def refilled(amount: ColumnElement[float], rate: ColumnElement[float]) -> ColumnElement[float]:
        return case(
            (rates.c.cut, func.least(amount, 0.0)),
            else_=func.least(rate, amount + rate * rates.c.elapsed / 60.0),
        )

    available = select(
        rates,
        refilled(rates.c.tokens, rates.c.new_tpm).label("tokens_now"),
        refilled(rates.c.requests, rates.c.new_rpm).label("requests_now"),
    ).cte("available")

    fits = func.least(
        p.c.wanted,
        func.floor(available.c.tokens_now / p.c.per_call),
        func.floor(available.c.requests_now),
    )
    granted = (
        select(available, p.c.per_call, cast(func.greatest(0, fits), Integer).label("calls"))
        .select_from(available.join(p, true()))
        .cte("granted")
    )

    q = llm_quota_buckets
    return (
        update(q)
        .values(
            tokens_per_minute=granted.c.new_tpm,
            requests_per_minute=granted.c.new_rpm,
            tokens=granted.c.tokens_now - granted.c.calls * granted.c.per_call,
            requests=granted.c.requests_now - granted.c.calls,
            refilled_at=func.clock_timestamp(),
            throttled_at=case((granted.c.cut, func.clock_timestamp()), else_=q.c.throttled_at),
        )
        .where(q.c.model_id == granted.c.model_id)
        .returning(
            granted.c.calls,
            q.c.tokens,
            q.c.requests,
            q.c.tokens_per_minute,
            q.c.requests_per_minute,
        )
    )


_CREATE = (
    insert(llm_quota_buckets)
    .values(
        model_id=bindparam("model", type_=Text),
        tokens_per_minute=bindparam("tpm", type_=DOUBLE_PRECISION),
        requests_per_minute=bindparam("rpm", type_=DOUBLE_PRECISION),
        tokens=bindparam("tpm", type_=DOUBLE_PRECISION),
        requests=bindparam("rpm", type_=DOUBLE_PRECISION),
    )
    .on_conflict_do_nothing(index_elements=[llm_quota_buckets.c.model_id])
)


def take_calls(
    connection: Connection,
    model_id: str,
    *,
    calls: int,
    tokens_per_call: float,
    throttled: bool,
    pace: Pace,
) -> Take | None:
    """Take up to ``calls`` calls of ``tokens_per_call`` reserved tokens each from
    the model's bucket, locking its row until the caller's transaction ends.

    Returns None when the model has no bucket yet (see :func:`create_bucket`).
    """
    row = connection.execute(
        _take_statement(),
        {
            "model": model_id,
            "wanted": calls,
            "per_call": tokens_per_call,
            "throttled": throttled,
            "cut_to": pace.throttle_cut,
            "recovery": pace.recovery_per_minute,
            "ceiling_tpm": pace.ceiling_tokens_per_minute,
            "ceiling_rpm": pace.ceiling_requests_per_minute,
            "cooldown": pace.throttle_cooldown,
            "calm": pace.calm,
        },
    ).one_or_none()
    if row is None:
        return None
    calls_granted, tokens, requests, tokens_per_minute, requests_per_minute = row
    return Take(calls_granted, tokens, requests, tokens_per_minute, requests_per_minute)


def create_bucket(
    connection: Connection, model_id: str, *, tokens_per_minute: float, requests_per_minute: float
) -> None:
    """The model's bucket, full at these rates; nothing if another container made it first."""
    connection.execute(
        _CREATE, {"model": model_id, "tpm": tokens_per_minute, "rpm": requests_per_minute}
    )
