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

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = "0008"
down_revision = "0007"

_KERNEL = "post_points(jsonb, boolean, boolean, jsonb, boolean)"


def _revision_0007() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kernel_0007", Path(__file__).with_name("0007_kernel_returns_events.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# 0007's post_points, edited as 0007 edits 0006's (so its body stays written once).
_EDITS = [
    ("CREATE FUNCTION post_points", "CREATE OR REPLACE FUNCTION post_points"),
    (
        "        WHERE accounts.id = f.id AND accounts.version <> f.version;",
        "        WHERE accounts.id = ANY (ARRAY(SELECT (u).id FROM unnest(found_accounts) AS u))\n"
        "            AND accounts.id = f.id AND accounts.version <> f.version;",
    ),
]


def post_points() -> str:
    """The kernel as of this revision."""
    kernel = _revision_0007().post_points()
    for old, new in _EDITS:
        assert kernel.count(old) == 1, old
        kernel = kernel.replace(old, new)
    return kernel


def upgrade() -> None:
    op.execute(post_points())
    op.execute(f"ALTER FUNCTION {_KERNEL} SET enable_seqscan = off")
    op.execute(
        "CREATE INDEX ix_accounts_former_customer ON accounts (program_id, customer)"
        " WHERE status <> 'ACTIVE'"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix_accounts_former_customer")
    op.execute(f"ALTER FUNCTION {_KERNEL} RESET enable_seqscan")
    op.execute(_EDITS[0][1].join(_revision_0007().post_points().split(_EDITS[0][0], 1)))
