"""usage shards: a month's count of a tenant in several rows, so concurrent submits of a tenant
without a quota do not serialise on one row's lock

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenant_usage", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shard", sa.SmallInteger(), nullable=False, server_default="0"))
        batch_op.drop_constraint("pk_tenant_usage", type_="primary")
        batch_op.create_primary_key("pk_tenant_usage", ["tenant_id", "month", "shard"])


def downgrade() -> None:
    # The shards of a month folded back into one row.
    op.execute(
        "UPDATE tenant_usage SET images = (SELECT sum(u.images) FROM tenant_usage u "
        "WHERE u.tenant_id = tenant_usage.tenant_id AND u.month = tenant_usage.month) WHERE shard = 0"
    )
    op.execute("DELETE FROM tenant_usage WHERE shard <> 0")
    with op.batch_alter_table("tenant_usage", schema=None) as batch_op:
        batch_op.drop_constraint("pk_tenant_usage", type_="primary")
        batch_op.create_primary_key("pk_tenant_usage", ["tenant_id", "month"])
        batch_op.drop_column("shard")
