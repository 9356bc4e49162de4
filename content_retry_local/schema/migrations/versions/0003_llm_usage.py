"""What each item's LLM calls cost: calls, input and output tokens, summed over attempts.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Defaults, so rows written by the version still running during a deploy
    # (which knows nothing of these columns) are valid too.
    op.execute(
        "ALTER TABLE retry_items "
        "ADD COLUMN IF NOT EXISTS llm_calls integer NOT NULL DEFAULT 0, "
        "ADD COLUMN IF NOT EXISTS input_tokens bigint NOT NULL DEFAULT 0, "
        "ADD COLUMN IF NOT EXISTS output_tokens bigint NOT NULL DEFAULT 0"
    )
