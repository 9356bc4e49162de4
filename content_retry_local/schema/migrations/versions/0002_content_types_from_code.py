"""The ledger stops naming the content types: they are declared once, in the code.

A fourth content type then needs no migration of the ledger.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE retry_items DROP CONSTRAINT IF EXISTS retry_items_content_type_known")
