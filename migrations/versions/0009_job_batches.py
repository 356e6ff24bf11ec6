"""batching: jobs.batch_key, and the batch a job ran in (batch_id, batch_size)

``batch_key`` (written at submit) is what a worker looks compatible queued jobs up by; the index
serves its query (queued jobs of one key, oldest first). ``batch_id`` and ``batch_size`` record the
pipeline call a job shared, for GET /v1/jobs/{id} and its webhooks.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("batch_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("batch_size", sa.Integer(), nullable=True))
        batch_op.create_index("ix_jobs_batch_key", ["batch_key", "status", "created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_batch_key")
        batch_op.drop_column("batch_size")
        batch_op.drop_column("batch_id")
        batch_op.drop_column("batch_key")
