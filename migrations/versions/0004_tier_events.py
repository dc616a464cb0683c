"""The loyalty.account.tier_changed event type."""

from alembic import op

revision = "0004"
down_revision = "0003"

EVENT_TYPES = (
    "'loyalty.account.created', 'loyalty.account.updated', 'loyalty.account.closed',"
    " 'loyalty.account.reopened', 'loyalty.account.merged', 'points_transaction.created'"
)
WITH_TIER_CHANGED = EVENT_TYPES + ", 'loyalty.account.tier_changed'"


def _replace_type_check(types: str) -> None:
    # NOT VALID, then VALIDATE: the check of the existing rows runs without blocking writes
    # to the event log (only adding the constraint takes its table lock, briefly).
    op.drop_constraint(op.f("ck_events_type"), "events")
    op.execute(
        f"ALTER TABLE events ADD CONSTRAINT ck_events_type CHECK (type IN ({types})) NOT VALID"
    )
    op.execute("ALTER TABLE events VALIDATE CONSTRAINT ck_events_type")


def upgrade() -> None:
    _replace_type_check(WITH_TIER_CHANGED)


def downgrade() -> None:
    # Fails while the log holds tier_changed events: prune them or keep this revision.
    _replace_type_check(EVENT_TYPES)
