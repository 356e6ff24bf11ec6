"""AMQP ingress and webhook profiles: a job's reply queue and profile, a tenant's default profile and
bearer token, and the kind of each webhook delivery.

Revision ID: 0008
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from inference_server.db.base import JSONType

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("webhook_profile", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("reply_to", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("correlation_id", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("reply_events", JSONType, nullable=True))
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("default_webhook_profile", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("webhook_token", sa.String(length=500), nullable=True))
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="standard")
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_column("kind")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("webhook_token")
        batch_op.drop_column("default_webhook_profile")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("reply_events")
        batch_op.drop_column("correlation_id")
        batch_op.drop_column("reply_to")
        batch_op.drop_column("webhook_profile")
