"""The LLM quota as a pool: one token bucket row per model, shared by every
generate container (content_retry.pacing).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS llm_quota_buckets (
          model_id            text PRIMARY KEY,
          tokens_per_minute   double precision NOT NULL,
          requests_per_minute double precision NOT NULL,
          tokens              double precision NOT NULL,
          requests            double precision NOT NULL,
          refilled_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
          throttled_at        timestamptz
        )
        """
    )
