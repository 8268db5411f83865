"""Devices: the allocator policy their latencies hold under (retain or system).

Devices registered before this revision get ``retain``: every profile was measured keeping freed
memory, the profiler's policy until devices could state another.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device") as batch_op:
        batch_op.add_column(
            sa.Column("allocator", sa.String(length=16), server_default="retain", nullable=False)
        )
        batch_op.create_check_constraint(
            op.f("ck_device_allocator_valid"), "allocator IN ('retain', 'system')"
        )


def downgrade() -> None:
    with op.batch_alter_table("device") as batch_op:
        batch_op.drop_constraint(op.f("ck_device_allocator_valid"), type_="check")
        batch_op.drop_column("allocator")
