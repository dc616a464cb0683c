"""Programs: currency, auto-enrollment, tiers, status, update time and a paging keyset."""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003"
down_revision = "0002"

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Existing programs, prog_default among them, were in dollars; new ones always name
    # their currency, so the column keeps no default.
    op.add_column("programs", sa.Column("currency", sa.Text, nullable=False, server_default="USD"))
    op.alter_column("programs", "currency", server_default=None)
    op.add_column(
        "programs",
        sa.Column("auto_enroll", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.add_column(
        "programs",
        sa.Column("tiers", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
    )
    op.add_column("programs", sa.Column("status", sa.Text, nullable=False, server_default="ACTIVE"))
    op.create_check_constraint(
        op.f("ck_programs_status"), "programs", "status IN ('ACTIVE', 'ARCHIVED')"
    )
    op.add_column("programs", sa.Column("update_time", TIME))
    op.execute("UPDATE programs SET update_time = create_time")
    op.alter_column("programs", "update_time", nullable=False)
    # Adding an identity column numbers the existing rows.
    op.add_column("programs", sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False))
    op.create_unique_constraint(op.f("uq_programs_seq"), "programs", ["seq"])


def downgrade() -> None:
    op.drop_constraint(op.f("uq_programs_seq"), "programs")
    op.drop_constraint(op.f("ck_programs_status"), "programs")
    for column in ("seq", "update_time", "status", "tiers", "auto_enroll", "currency"):
        op.drop_column("programs", column)
