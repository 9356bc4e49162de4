"""One deadline per invocation (DESIGN §12): the Lambda context's time left, less a
reserve, bounds every statement, LLM call and queue send."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class DeadlineExceededError(TimeoutError):
    """Too little of the invocation is left for this stage: it was not started."""


class RemainingTime(Protocol):
    """What a deadline needs of a Lambda context."""

    def get_remaining_time_in_millis(self) -> int: ...


# A stage given less than this is not started: no statement or send answers
# usefully in less, and the time is better kept for the answer.
MIN_STAGE_SECONDS = 0.2


class Deadline:
    """The time an invocation has left for its work, the reserve kept aside.

    Args:
        seconds_left: the invocation's remaining time (the context's clock).
        reserve_seconds: kept to answer (build and return the response).
    """

    def __init__(self, seconds_left: Callable[[], float], *, reserve_seconds: float) -> None:
        self._seconds_left = seconds_left
        self.reserve_seconds = reserve_seconds

    @classmethod
    def of_context(
        cls,
        context: RemainingTime | None,
        *,
        reserve_seconds: float,
        at_most_seconds: float | None = None,
    ) -> Deadline:
        """The deadline of a Lambda context (none: unbounded, as for a local call).

        Args:
            at_most_seconds: a limit of the caller's, from now, tighter than the
                function's timeout (API Gateway's 29 s for the API path).
        """
        limit = None if at_most_seconds is None else time.monotonic() + at_most_seconds

        def seconds_left() -> float:
            left = float("inf")
            if context is not None:
                left = context.get_remaining_time_in_millis() / 1000
            if limit is not None:
                left = min(left, limit - time.monotonic())
            return left

        return cls(seconds_left, reserve_seconds=reserve_seconds)

    def left(self) -> float:
        """Seconds left for work (the reserve excluded); may be negative."""
        return self._seconds_left() - self.reserve_seconds

    def stage(self, at_most: float) -> float:
        """The seconds a stage may take: ``at_most``, or what is left if less.

        Raises:
            DeadlineExceededError: too little is left to start the stage.
        """
        left = self.left()
        if left < MIN_STAGE_SECONDS:
            raise DeadlineExceededError(
                f"{max(left, 0):.1f}s left before the invocation's deadline "
                f"(with {self.reserve_seconds:.0f}s kept to answer): not started"
            )
        return min(at_most, left)


UNBOUNDED = Deadline(lambda: float("inf"), reserve_seconds=0)

_current: ContextVar[Deadline] = ContextVar("content_retry_deadline", default=UNBOUNDED)


def current() -> Deadline:
    """The deadline in force (unbounded outside :func:`applied`)."""
    return _current.get()


@contextmanager
def applied(deadline: Deadline) -> Iterator[Deadline]:
    """Make ``deadline`` the one in force in this block (and this thread's
    context, which pool threads started with ``contextvars.copy_context`` share)."""
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)
