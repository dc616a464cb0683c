"""Postings and a new member's first payment find their accounts by key, whatever the
table's size when their statements were planned.

PostgreSQL keeps a prepared statement's plan, and PL/pgSQL a function's, for the session.
Planned while `accounts` was small (a new database, or a program's first members), the
kernel's account lock and account update chose a sequential scan, the update a hash join
over the whole table, and the look-up of a customer's former accounts the program's index;
they kept those plans as the table grew, so every posting, and every new member's payment,
read every account of the program. Now:
- the kernel's update names its rows by key (`id = ANY`), and the kernel runs without
  sequential scans: every row it reads or writes is found through an index;
- a customer's CLOSED and MERGED accounts have an index of their own (it holds no ACTIVE
  account, so it is small and costs ACTIVE accounts nothing).
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"

_KERNEL = "post_points(jsonb, boolean, boolean, jsonb, boolean)"

# The kernel's account update, before and after: an edit of the function as the database
# holds it (0007's), so that its body stays written once.
_UPDATE_BY_JOIN = "        WHERE accounts.id = f.id AND accounts.version <> f.version;"
_UPDATE_BY_KEY = (
    "        WHERE accounts.id = ANY (ARRAY(SELECT (u).id FROM unnest(found_accounts) AS u))\n"
    "            AND accounts.id = f.id AND accounts.version <> f.version;"
)


def _edit_kernel(old: str, new: str) -> None:
    query = sa.text(f"SELECT pg_get_functiondef('{_KERNEL}'::regprocedure)")
    kernel = op.get_bind().execute(query).scalar_one()  # CREATE OR REPLACE FUNCTION ...
    assert kernel.count(old) == 1, old
    op.execute(kernel.replace(old, new))


def upgrade() -> None:
    _edit_kernel(_UPDATE_BY_JOIN, _UPDATE_BY_KEY)
    op.execute(f"ALTER FUNCTION {_KERNEL} SET enable_seqscan = off")
    op.execute(
        "CREATE INDEX ix_accounts_former_customer ON accounts (program_id, customer)"
        " WHERE status <> 'ACTIVE'"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix_accounts_former_customer")
    op.execute(f"ALTER FUNCTION {_KERNEL} RESET enable_seqscan")
    _edit_kernel(_UPDATE_BY_KEY, _UPDATE_BY_JOIN)
