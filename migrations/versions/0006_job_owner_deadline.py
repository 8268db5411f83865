"""Jobs: the API key that requested each one, an overall deadline, and when a deferred job runs again.

Jobs queued before this revision have no deadline.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch_op:
        batch_op.add_column(sa.Column("key_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_foreign_key(
            op.f("fk_job_key_id_api_key"), "api_key", ["key_id"], ["id"], ondelete="SET NULL"
        )
        batch_op.create_index(op.f("ix_job_key_id"), ["key_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job") as batch_op:
        batch_op.drop_index(op.f("ix_job_key_id"))
        batch_op.drop_constraint(op.f("fk_job_key_id_api_key"), type_="foreignkey")
        batch_op.drop_column("not_before")
        batch_op.drop_column("deadline_at")
        batch_op.drop_column("key_id")
