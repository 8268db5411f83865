"""Speed probe: network measurements keep the probe time and the latency relative to it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("network_measurement") as batch_op:
        batch_op.add_column(sa.Column("probe_ms", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("relative_latency", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("probe_version", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("network_measurement") as batch_op:
        batch_op.drop_column("probe_version")
        batch_op.drop_column("relative_latency")
        batch_op.drop_column("probe_ms")
