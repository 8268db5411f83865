"""Predictor plots: the predicted-vs-measured PNG of each fit, stored with the predictor.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictor") as batch_op:
        batch_op.add_column(sa.Column("plot_png", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictor") as batch_op:
        batch_op.drop_column("plot_png")
