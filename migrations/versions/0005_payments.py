"""Earning rules, payments and refunds."""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

revision = "0005"
down_revision = "0004"

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column(
        "programs",
        sa.Column("earning_rules", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    )
    # Nullable columns without defaults: adding them rewrites nothing.
    op.add_column("points_transactions", sa.Column("rule_id", sa.Text))
    op.add_column("points_transactions", sa.Column("rule_version", sa.Integer))
    op.create_table(
        "earning_rule_versions",
        sa.Column("rule_id", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("program_id", sa.Text, sa.ForeignKey("programs.id"), nullable=False),
        sa.Column("rule", JSONB, nullable=False),
        sa.Column("create_time", TIME, nullable=False),
    )
    op.create_table(
        "payments",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("program_id", sa.Text, sa.ForeignKey("programs.id"), nullable=False),
        sa.Column("customer", sa.Text),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("occurred_at", TIME, nullable=False),
        sa.Column("metadata", JSONB, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text),
        sa.Column("account_id", sa.Text, sa.ForeignKey("accounts.id")),
        sa.Column("earn_ids", ARRAY(sa.Text), nullable=False, server_default="{}"),
        sa.Column("refunded_amount", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("response", JSONB),
        sa.Column("create_time", TIME, nullable=False),
        sa.CheckConstraint("amount > 0", name="amount"),
        sa.CheckConstraint("refunded_amount BETWEEN 0 AND amount", name="refunded_amount"),
    )
    op.create_table(
        "refunds",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("payment_id", sa.Text, sa.ForeignKey("payments.id"), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("response", JSONB),
        sa.Column("create_time", TIME, nullable=False),
        sa.CheckConstraint("amount > 0", name="amount"),
    )
    op.create_index("ix_refunds_payment_id", "refunds", ["payment_id"])


def downgrade() -> None:
    op.drop_table("refunds")
    op.drop_table("payments")
    op.drop_table("earning_rule_versions")
    op.drop_column("points_transactions", "rule_version")
    op.drop_column("points_transactions", "rule_id")
    op.drop_column("programs", "earning_rules")
