"""The pipeline's own tables: retry tasks, the item ledger, the sweep's visits.

Exactly what ``content-retry db init`` created before migrations existed (0.1),
and created only where missing, so a database made by that ``db init`` is
brought under migration as it is.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
CREATE TABLE IF NOT EXISTS retry_tasks (
  task_id     uuid NOT NULL DEFAULT gen_random_uuid(),
  roadmap_id  text NOT NULL,
  user_id     text NOT NULL,
  trigger     text NOT NULL,
  preferences jsonb NOT NULL DEFAULT '{}'::jsonb,
  last_error  text,
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (task_id),
  CONSTRAINT retry_tasks_trigger_known CHECK (trigger IN ('api', 'sweep', 'invoke')),
  FOREIGN KEY (roadmap_id) REFERENCES roadmap_metadata (roadmap_id) ON DELETE CASCADE
)"""
    )
    op.execute(
        "CREATE INDEX IF NOT EXISTS retry_tasks_by_roadmap ON retry_tasks (roadmap_id, created_at)"
    )
    op.execute(
        """
CREATE TABLE IF NOT EXISTS roadmap_sweeps (
  roadmap_id text NOT NULL,
  swept_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (roadmap_id),
  FOREIGN KEY (roadmap_id) REFERENCES roadmap_metadata (roadmap_id) ON DELETE CASCADE
)"""
    )
    op.execute(
        """
CREATE TABLE IF NOT EXISTS retry_items (
  task_id      uuid NOT NULL,
  concept_id   text NOT NULL,
  content_type text NOT NULL,
  roadmap_id   text NOT NULL,
  reason       text NOT NULL,
  status       text NOT NULL DEFAULT 'queued',
  attempts     integer NOT NULL DEFAULT 0,
  last_error   text,
  claimed_at   timestamptz NOT NULL DEFAULT now(),
  updated_at   timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT retry_items_pkey PRIMARY KEY (task_id, concept_id, content_type),
  FOREIGN KEY (task_id) REFERENCES retry_tasks (task_id) ON DELETE CASCADE,
  CONSTRAINT retry_items_status_known
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'dead_lettered')),
  CONSTRAINT retry_items_content_type_known
    CHECK (content_type IN ('tutorial', 'resources', 'quiz')),
  CONSTRAINT retry_items_reason_known CHECK (reason IN ('missing', 'failed', 'stale'))
)"""
    )
    # The judge looks up live claims of one roadmap; only claiming rows are
    # indexed, so the index stays as small as the work in flight.
    op.execute(
        "CREATE INDEX IF NOT EXISTS retry_items_live_claims "
        "ON retry_items (roadmap_id, concept_id, content_type) "
        "WHERE status IN ('queued', 'running')"
    )
