"""Every change records its actor: the identity of the caller that made it.

Ledger rows, accounts (the actor of their latest change, postings included), programs and
their earning rules' versions, payments, refunds and merges gain `actor`. Rows written
before this revision, and by a replica of the release before while this one rolls out,
keep the empty actor: it was not recorded.

Request ids are scoped per actor: a stored request key begins with its actor and the
ASCII unit separator (identities never hold control characters), so one caller's request
id never replays or blocks another's. Keys stored before are the `anonymous` caller's,
which every caller was.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"

_TABLES = (
    "accounts",
    "points_transactions",
    "programs",
    "earning_rule_versions",
    "payments",
    "refunds",
    "account_merges",
)
_KERNEL = "post_points(jsonb, boolean, boolean, jsonb, boolean)"
_SEPARATOR = "\x1f"

# The kernel, as the database holds it (0008's), edited so that its body stays written
# once: each posting's `actor` goes on its ledger row and on its account.
_EDITS = [
    (
        "            closed_ok boolean, reverses_id text, create_time timestamptz, key text,\n"
        "            event_id text)",
        "            closed_ok boolean, reverses_id text, create_time timestamptz, key text,\n"
        "            event_id text, actor text)",
    ),
    (
        "        a.update_time := p.create_time;\n",
        "        a.update_time := p.create_time;\n        a.actor := coalesce(p.actor, '');\n",
    ),
    (
        "            tier = f.tier, update_time = f.update_time, version = f.version\n",
        "            tier = f.tier, update_time = f.update_time, version = f.version,\n"
        "            actor = f.actor\n",
    ),
    (
        "            reversed_amount, metadata, create_time, rule_id, rule_version)\n",
        "            reversed_amount, metadata, create_time, rule_id, rule_version, actor)\n",
    ),
    (
        "            r.create_time, r.rule_id, r.rule_version\n",
        "            r.create_time, r.rule_id, r.rule_version, coalesce(r.actor, '')\n",
    ),
    (
        "                create_time timestamptz)\n            JOIN unnest(posted_idx",
        "                create_time timestamptz, actor text)\n            JOIN unnest(posted_idx",
    ),
]

# 0006's account_json, with the actor.
ACCOUNT_JSON = """
CREATE OR REPLACE FUNCTION account_json(a accounts) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN jsonb_build_object('id', a.id, 'program', a.program_id, 'customer', a.customer,
        'status', a.status, 'balance', a.balance, 'lifetime_points', a.lifetime_points,
        'tier', a.tier, 'metadata', a.metadata, 'create_time', a.create_time,
        'update_time', a.update_time, 'merged_into', a.merged_into, 'version', a.version,
        'actor', a.actor);
END
$$
"""


def _kernel() -> str:
    query = sa.text(f"SELECT pg_get_functiondef('{_KERNEL}'::regprocedure)")
    return op.get_bind().execute(query).scalar_one()  # CREATE OR REPLACE FUNCTION ...


def upgrade() -> None:
    for table in _TABLES:
        # A constant default: no table rewrite.
        op.execute(f"ALTER TABLE {table} ADD COLUMN actor text NOT NULL DEFAULT ''")
    op.execute(ACCOUNT_JSON)
    kernel = _kernel()
    for old, new in _EDITS:
        assert kernel.count(old) == 1, old
        kernel = kernel.replace(old, new)
    op.execute(kernel)
    op.execute(
        sa.text("UPDATE idempotency_keys SET key = 'anonymous' || :separator || key").bindparams(
            separator=_SEPARATOR
        )
    )


def downgrade() -> None:
    # Only the anonymous caller's keys have a meaning before this revision.
    op.execute(
        sa.text(
            "DELETE FROM idempotency_keys WHERE key NOT LIKE 'anonymous' || :separator || '%'"
        ).bindparams(separator=_SEPARATOR)
    )
    op.execute(
        sa.text(
            "UPDATE idempotency_keys SET key = substr(key, length('anonymous' || :separator) + 1)"
        ).bindparams(separator=_SEPARATOR)
    )
    kernel = _kernel()
    for old, new in reversed(_EDITS):
        assert kernel.count(new) == 1, new
        kernel = kernel.replace(new, old)
    op.execute(kernel)
    op.execute(ACCOUNT_JSON.replace(",\n        'actor', a.actor);", ");"))
    for table in _TABLES:
        op.execute(f"ALTER TABLE {table} DROP COLUMN actor")
