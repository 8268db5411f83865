"""Latency plots: the per-layer chart of a latency query that asked for one, kept for the key that asked
until it expires.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "latency_plot",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("png", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_key.id"], name=op.f("fk_latency_plot_key_id_api_key"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_latency_plot")),
    )
    op.create_index(op.f("ix_latency_plot_key_id"), "latency_plot", ["key_id"], unique=False)
    op.create_index(op.f("ix_latency_plot_created_at"), "latency_plot", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_latency_plot_created_at"), table_name="latency_plot")
    op.drop_index(op.f("ix_latency_plot_key_id"), table_name="latency_plot")
    op.drop_table("latency_plot")
