"""The one judge's rule (DESIGN §4), written out as a table, not as code.

Read row by row: given the concept's status in ``framework_data``, the item's
latest row (none, completed, failed) and the claims on it, is it planned, for
which reason, and what does its framework status read afterwards? Both the
rule's unit test and the judge's test on PostgreSQL check the code against
these rows, so a rule changed in the code alone fails them.

- planned exactly when there is no completed latest row and no live claim;
- reason ``failed`` when the framework or the latest row says failed, ``stale``
  when the framework says processing, otherwise ``missing``;
- a completed latest row repairs a framework status of null or failed.
"""

from __future__ import annotations

# (framework status, latest row, claim): (reason planned, or None; framework status after)
RULE: dict[tuple[str | None, str, str], tuple[str | None, str | None]] = {
    # no latest row
    (None, "none", "none"): ("missing", None),
    (None, "none", "live"): (None, None),
    (None, "none", "expired"): ("missing", None),
    ("pending", "none", "none"): ("missing", "pending"),
    ("pending", "none", "live"): (None, "pending"),
    ("pending", "none", "expired"): ("missing", "pending"),
    ("processing", "none", "none"): ("stale", "processing"),
    ("processing", "none", "live"): (None, "processing"),
    ("processing", "none", "expired"): ("stale", "processing"),
    ("completed", "none", "none"): ("missing", "completed"),
    ("completed", "none", "live"): (None, "completed"),
    ("completed", "none", "expired"): ("missing", "completed"),
    ("failed", "none", "none"): ("failed", "failed"),
    ("failed", "none", "live"): (None, "failed"),
    ("failed", "none", "expired"): ("failed", "failed"),
    # a completed latest row: never planned, whatever the claims
    (None, "completed", "none"): (None, "completed"),
    (None, "completed", "live"): (None, "completed"),
    (None, "completed", "expired"): (None, "completed"),
    ("pending", "completed", "none"): (None, "pending"),
    ("pending", "completed", "live"): (None, "pending"),
    ("pending", "completed", "expired"): (None, "pending"),
    ("processing", "completed", "none"): (None, "processing"),
    ("processing", "completed", "live"): (None, "processing"),
    ("processing", "completed", "expired"): (None, "processing"),
    ("completed", "completed", "none"): (None, "completed"),
    ("completed", "completed", "live"): (None, "completed"),
    ("completed", "completed", "expired"): (None, "completed"),
    ("failed", "completed", "none"): (None, "completed"),
    ("failed", "completed", "live"): (None, "completed"),
    ("failed", "completed", "expired"): (None, "completed"),
    # a failed latest row
    (None, "failed", "none"): ("failed", None),
    (None, "failed", "live"): (None, None),
    (None, "failed", "expired"): ("failed", None),
    ("pending", "failed", "none"): ("failed", "pending"),
    ("pending", "failed", "live"): (None, "pending"),
    ("pending", "failed", "expired"): ("failed", "pending"),
    ("processing", "failed", "none"): ("failed", "processing"),
    ("processing", "failed", "live"): (None, "processing"),
    ("processing", "failed", "expired"): ("failed", "processing"),
    ("completed", "failed", "none"): ("failed", "completed"),
    ("completed", "failed", "live"): (None, "completed"),
    ("completed", "failed", "expired"): ("failed", "completed"),
    ("failed", "failed", "none"): ("failed", "failed"),
    ("failed", "failed", "live"): (None, "failed"),
    ("failed", "failed", "expired"): ("failed", "failed"),
}
