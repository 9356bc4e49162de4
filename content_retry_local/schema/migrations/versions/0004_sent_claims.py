"""A claim holds while its message waits in the queue, however long the backlog.

``sent_at`` records when an item's message was sent: a queued or running
item whose message was sent stays claimed until it is processed or
dead-lettered, or until the queue's retention has certainly dropped it.
The partial index finds such waiting items by age for the sweep.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE retry_items ADD COLUMN IF NOT EXISTS sent_at timestamptz")
    op.execute(
        "CREATE INDEX IF NOT EXISTS retry_items_waiting_since ON retry_items (sent_at) "
        "WHERE status IN ('queued', 'running')"
    )
