"""runtime registry: models and LoRAs added through the API, warm placement, admin keys

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import inference_server.db.base

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = inference_server.db.base.UTCDateTime(timezone=True)
JSON = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("admin", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "runtime_models",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("family", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("df11", sa.Text(), nullable=True),
        sa.Column("defaults", JSON, nullable=True),
        sa.Column("limits", JSON, nullable=True),
        sa.Column("owner_tenant_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_tenant_id"], ["tenants.id"],
            name=op.f("fk_runtime_models_owner_tenant_id_tenants"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runtime_models")),
        sa.UniqueConstraint("family", "model_id", name="uq_runtime_models_family_model"),
    )
    op.create_table(
        "runtime_loras",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("family", sa.String(length=64), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("weight_name", sa.String(length=200), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("owner_tenant_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_tenant_id"], ["tenants.id"],
            name=op.f("fk_runtime_loras_owner_tenant_id_tenants"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runtime_loras")),
        sa.UniqueConstraint("name", name=op.f("uq_runtime_loras_name")),
    )
    op.create_table(
        "registry_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_version")),
    )
    op.execute("INSERT INTO registry_version (id, version) VALUES (1, 0)")
    op.create_table(
        "placement_requests",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("family", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_placement_requests")),
    )
    with op.batch_alter_table("placement_requests", schema=None) as batch_op:
        batch_op.create_index("ix_placement_requests_family_id", ["family", "id"], unique=False)
    op.create_table(
        "placement_answers",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("request_id", BigId, nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["placement_requests.id"],
            name=op.f("fk_placement_answers_request_id_placement_requests"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_placement_answers")),
        sa.UniqueConstraint("request_id", "worker", name="uq_placement_answers_request_worker"),
    )
    op.create_table(
        "worker_models",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("family", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=200), nullable=False),
        sa.Column("loaded_at", When, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker_models")),
        sa.UniqueConstraint("worker", "family", "model_id", name="uq_worker_models_worker_model"),
    )


def downgrade() -> None:
    op.drop_table("worker_models")
    op.drop_table("placement_answers")
    with op.batch_alter_table("placement_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_placement_requests_family_id")
    op.drop_table("placement_requests")
    op.drop_table("registry_version")
    op.drop_table("runtime_loras")
    op.drop_table("runtime_models")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("admin")
