"""composition: output kinds and safety verdicts, tenants' safety default and prompt deny-list

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import inference_server.db.base

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_outputs", schema=None) as batch_op:
        # image (a generated image), control (a ControlNet's image after preprocessing), mask.
        batch_op.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="image"))
        batch_op.add_column(sa.Column("nsfw", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("nsfw_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("blocked", sa.Boolean(), nullable=False, server_default=sa.false()))
        # A blocked output stores nothing; a control image or a mask has no seed.
        batch_op.alter_column("uri", existing_type=sa.Text(), nullable=True)
        batch_op.alter_column("content_type", existing_type=sa.String(length=64), nullable=True)
        batch_op.alter_column("sha256", existing_type=sa.String(length=64), nullable=True)
        batch_op.alter_column("seed", existing_type=sa.BigInteger(), nullable=True)
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("safety", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("deny_words", inference_server.db.base.JSONType, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("deny_words")
        batch_op.drop_column("safety")
    # The earlier schema can hold only stored images with a seed.
    op.execute("DELETE FROM job_outputs WHERE uri IS NULL OR kind <> 'image'")
    with op.batch_alter_table("job_outputs", schema=None) as batch_op:
        batch_op.alter_column("seed", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column("sha256", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("content_type", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("uri", existing_type=sa.Text(), nullable=False)
        batch_op.drop_column("blocked")
        batch_op.drop_column("nsfw_score")
        batch_op.drop_column("nsfw")
        batch_op.drop_column("kind")
