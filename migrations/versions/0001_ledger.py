"""Programs, accounts, the points ledger, merges and idempotency keys."""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "programs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("create_time", TIME, nullable=False, server_default=sa.text("now()")),
    )
    op.execute("INSERT INTO programs (id, name) VALUES ('prog_default', 'Default program')")

    op.create_table(
        "accounts",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False, unique=True),
        sa.Column("program_id", sa.Text, sa.ForeignKey("programs.id"), nullable=False),
        sa.Column("customer", sa.Text),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.Column("lifetime_points", sa.BigInteger, nullable=False),
        sa.Column("tier", sa.Text, nullable=False),
        sa.Column("metadata", JSONB, nullable=False),
        sa.Column("create_time", TIME, nullable=False),
        sa.Column("update_time", TIME, nullable=False),
        sa.Column("merged_into", sa.Text, sa.ForeignKey("accounts.id")),
        sa.CheckConstraint("status IN ('ACTIVE', 'CLOSED', 'MERGED')", name="status"),
        sa.CheckConstraint("lifetime_points >= 0", name="lifetime_points"),
        sa.CheckConstraint("(status = 'MERGED') = (merged_into IS NOT NULL)", name="merged_into"),
    )
    op.create_index(
        "uq_accounts_active_customer",
        "accounts",
        ["program_id", "customer"],
        unique=True,
        postgresql_where=sa.text("status = 'ACTIVE'"),
    )
    op.create_index("ix_accounts_customer_seq", "accounts", ["customer", "seq"])
    op.create_index("ix_accounts_program_id_seq", "accounts", ["program_id", "seq"])

    op.create_table(
        "points_transactions",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False, unique=True),
        sa.Column("account_id", sa.Text, sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("original_account_id", sa.Text, sa.ForeignKey("accounts.id")),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("direction", sa.Text, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("points_after", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("origin_kind", sa.Text, nullable=False),
        sa.Column("origin_id", sa.Text, nullable=False),
        sa.Column("reverses_id", sa.Text, sa.ForeignKey("points_transactions.id")),
        sa.Column("reversed_amount", sa.BigInteger, nullable=False),
        sa.Column("metadata", JSONB, nullable=False),
        sa.Column("create_time", TIME, nullable=False),
        sa.CheckConstraint("amount > 0", name="amount"),
        sa.CheckConstraint("reversed_amount BETWEEN 0 AND amount", name="reversed_amount"),
        sa.CheckConstraint(
            "type IN ('EARN', 'REDEEM', 'ADJUST', 'REVERSE', 'EXPIRE')", name="type"
        ),
        sa.CheckConstraint("direction IN ('CREDIT', 'DEBIT')", name="direction"),
        sa.CheckConstraint("(type = 'REVERSE') = (reverses_id IS NOT NULL)", name="reverses"),
    )
    op.create_index(
        "ix_points_transactions_account_id_seq", "points_transactions", ["account_id", "seq"]
    )
    op.create_index("ix_points_transactions_reverses_id", "points_transactions", ["reverses_id"])

    op.create_table(
        "account_merges",
        sa.Column("source_id", sa.Text, sa.ForeignKey("accounts.id"), primary_key=True),
        sa.Column("target_id", sa.Text, sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("balance_moved", sa.BigInteger, nullable=False),
        sa.Column("lifetime_moved", sa.BigInteger, nullable=False),
        sa.Column("after_seq", sa.BigInteger, nullable=False),
        sa.Column("create_time", TIME, nullable=False),
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("response", JSONB),
        sa.Column("create_time", TIME, nullable=False),
    )
    op.create_index("ix_idempotency_keys_create_time", "idempotency_keys", ["create_time"])

    op.create_table(
        "service_settings",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    # The key that signs page tokens, shared by every replica on this database.
    # gen_random_uuid() draws from a strong random source.
    op.execute(
        "INSERT INTO service_settings (name, value) VALUES ('page_token_key',"
        " replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''))"
    )


def downgrade() -> None:
    for table in (
        "service_settings",
        "idempotency_keys",
        "account_merges",
        "points_transactions",
        "accounts",
        "programs",
    ):
        op.drop_table(table)
