"""The event log (transactional outbox) and per-account version numbers."""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"

TIME = sa.DateTime(timezone=True)
EVENT_TYPES = (
    "'loyalty.account.created', 'loyalty.account.updated', 'loyalty.account.closed',"
    " 'loyalty.account.reopened', 'loyalty.account.merged', 'points_transaction.created'"
)


def upgrade() -> None:
    # Existing accounts start at version 1, as new ones do. The default stays, so that a
    # replica still on the previous release can create accounts during a rolling upgrade.
    op.add_column(
        "accounts", sa.Column("version", sa.BigInteger, nullable=False, server_default="1")
    )

    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger, primary_key=True),
        sa.Column("id", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("create_time", TIME, nullable=False),
        sa.Column("program_id", sa.Text, nullable=False),
        sa.Column("account_id", sa.Text, nullable=False),
        sa.Column("transaction_id", sa.Text),
        sa.Column("snapshot", JSONB),
        sa.CheckConstraint(f"type IN ({EVENT_TYPES})", name="type"),
        sa.CheckConstraint(
            "(type = 'points_transaction.created') = (transaction_id IS NOT NULL)"
            " AND (transaction_id IS NULL) = (snapshot IS NOT NULL)",
            name="snapshot",
        ),
    )
    op.create_index("ix_events_account_id_position", "events", ["account_id", "position"])
    op.create_index("ix_events_program_id_position", "events", ["program_id", "position"])

    op.create_table(
        "event_log_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
        sa.CheckConstraint("id = 1", name="one_row"),
    )
    op.execute("INSERT INTO event_log_head (id, position) VALUES (1, 0)")
    # Each commit that moves the head tells listening replicas (LISTEN loyalty_events) that
    # there is something new; the payload is only a hint.
    op.execute("""
        CREATE FUNCTION notify_event_log_head() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('loyalty_events', NEW.position::text);
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER event_log_head_moved AFTER UPDATE ON event_log_head
        FOR EACH ROW EXECUTE FUNCTION notify_event_log_head()
    """)


def downgrade() -> None:
    op.execute("DROP TRIGGER event_log_head_moved ON event_log_head")
    op.execute("DROP FUNCTION notify_event_log_head()")
    op.drop_table("event_log_head")
    op.drop_table("events")
    op.drop_column("accounts", "version")
