"""Recent paid calls per content type, for the retry plan's estimate.

The estimate averages the tokens of each content type's latest paid calls;
this partial index finds them without reading the whole ledger.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX IF NOT EXISTS retry_items_paid_by_type "
        "ON retry_items (content_type, updated_at) WHERE llm_calls > 0"
    )
