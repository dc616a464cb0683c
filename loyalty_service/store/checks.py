"""Invariant checks; each query returns the rows that break one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import datetime

import sqlalchemy as sa

from ..db import account_merges, accounts, payments, points_transactions, refunds
from ..domain.accounts import AccountStatus
from .sql import Conn, Row, compiled, const

_ptx = points_transactions


_signed = sa.case((_ptx.c.direction == const("CREDIT"), _ptx.c.amount), else_=-_ptx.c.amount)


_lifetime = sa.case(
    (
        sa.and_(
            _ptx.c.direction == const("CREDIT"),
            _ptx.c.type.in_([const("EARN"), const("ADJUST")]),
        ),
        _ptx.c.amount,
    ),
    else_=const(0),
)


_ledger_sums = (
    sa.select(
        _ptx.c.account_id,
        sa.func.sum(_signed).label("balance"),
        sa.func.sum(_lifetime).label("lifetime"),
    )
    .group_by(_ptx.c.account_id)
    .subquery()
)


_ledger_balance = sa.func.coalesce(_ledger_sums.c.balance, const(0))


_ledger_lifetime = sa.func.coalesce(_ledger_sums.c.lifetime, const(0))


_BALANCE_VIOLATIONS = compiled(
    sa.select(
        accounts.c.id,
        accounts.c.balance,
        accounts.c.lifetime_points,
        _ledger_balance.label("ledger_balance"),
        _ledger_lifetime.label("ledger_lifetime"),
    )
    .select_from(accounts.outerjoin(_ledger_sums, _ledger_sums.c.account_id == accounts.c.id))
    .where(
        sa.or_(
            accounts.c.balance != _ledger_balance, accounts.c.lifetime_points != _ledger_lifetime
        )
    )
)


def _sum_violations(total: sa.Column, parent_id: sa.Column, amount: sa.Column, label: str) -> str:
    """The rows whose `total` (a sum they keep) disagrees with the sum of `amount` over the
    rows whose `parent_id` points at them; that sum comes back as `label`."""
    parent = total.table
    sums = (
        sa.select(parent_id, sa.func.sum(amount).label(label))
        .where(parent_id.is_not(None))
        .group_by(parent_id)
        .subquery()
    )
    return compiled(
        sa.select(parent.c.id, total, sums.c[label])
        .select_from(parent.outerjoin(sums, sums.c[parent_id.name] == parent.c.id))
        .where(total != sa.func.coalesce(sums.c[label], const(0)))
    )


_reversal = _ptx.alias("reversal")


_REVERSAL_VIOLATIONS = _sum_violations(
    _ptx.c.reversed_amount, _reversal.c.reverses_id, _reversal.c.amount, "reversed"
)


_REFUND_VIOLATIONS = _sum_violations(
    payments.c.refunded_amount, refunds.c.payment_id, refunds.c.amount, "refunded"
)


_DUPLICATE_ACTIVE_CUSTOMERS = compiled(
    sa.select(accounts.c.program_id, accounts.c.customer, sa.func.count().label("n"))
    .where(accounts.c.status == const("ACTIVE"), accounts.c.customer.is_not(None))
    .group_by(accounts.c.program_id, accounts.c.customer)
    .having(sa.func.count() > const(1))
)


_MERGED_ACCOUNT_VIOLATIONS = compiled(
    sa.select(accounts.c.id, accounts.c.balance, accounts.c.lifetime_points).where(
        accounts.c.status == const("MERGED"),
        sa.or_(accounts.c.balance != const(0), accounts.c.lifetime_points != const(0)),
    )
)


# Every transaction under the account it was posted to, and every merge under its target,
# in posting order; a merge comes right after the transaction whose seq it records.
_chain_entries = sa.union_all(
    sa.select(
        sa.func.coalesce(_ptx.c.original_account_id, _ptx.c.account_id).label("account_id"),
        _ptx.c.seq.label("seq"),
        const(1).label("kind_order"),
        _ptx.c.id.label("id"),
        _signed.label("signed_amount"),
        _ptx.c.points_after.label("points_after"),
    ),
    sa.select(
        account_merges.c.target_id,
        account_merges.c.after_seq,
        const(2),
        account_merges.c.source_id,
        account_merges.c.balance_moved,
        sa.null(),
    ),
).subquery()


_CHAIN_ENTRIES = compiled(
    sa.select(_chain_entries).order_by(
        _chain_entries.c.account_id, _chain_entries.c.seq, _chain_entries.c.kind_order
    )
)


_ACCOUNT_BALANCES = compiled(sa.select(accounts.c.id, accounts.c.status, accounts.c.balance))


# Accounts whose held_points disagree with the sum of their HELD holds.
_HELD_VIOLATIONS = compiled(
    sa.text("""
    SELECT a.id, a.held_points, coalesce(h.held, 0) AS held
    FROM accounts AS a LEFT JOIN (
        SELECT account_id, sum(amount) AS held FROM points_holds
        WHERE status = 'HELD' GROUP BY account_id) AS h ON h.account_id = a.id
    WHERE a.held_points <> coalesce(h.held, 0)
    """)
)


# CAPTURED holds without exactly one REDEEM of their captured amount: the one they name, of
# origin REDEMPTION with their id, and no other such (captures reserve hold ids there).
_CAPTURE_VIOLATIONS = compiled(
    sa.text("""
    SELECT h.id, h.captured_amount, count(t.id) AS redeems,
        coalesce(sum(t.amount) FILTER (WHERE t.id = h.capture_transaction_id), 0) AS redeemed
    FROM points_holds AS h LEFT JOIN points_transactions AS t
        ON t.type = 'REDEEM' AND t.origin_kind = 'REDEMPTION' AND t.origin_id = h.id
    WHERE h.status = 'CAPTURED'
    GROUP BY h.id, h.captured_amount, h.capture_transaction_id
    HAVING count(t.id) <> 1
        OR coalesce(sum(t.amount) FILTER (WHERE t.id = h.capture_transaction_id), 0)
           <> h.captured_amount
    """)
)


async def _all(conn: Conn, sql: str) -> list[Row]:
    cursor = await conn.execute(sql)
    return await cursor.fetchall()


# Each invariant's query, and the line a row it returns becomes.
_VIOLATIONS: list[tuple[str, Callable[[Row], str]]] = [
    # Accounts whose cached totals disagree with their ledger.
    (
        _BALANCE_VIOLATIONS,
        lambda r: (
            f"account {r.id}: balance {r.balance} / lifetime {r.lifetime_points},"
            f" ledger says {r.ledger_balance} / {r.ledger_lifetime}"
        ),
    ),
    # Transactions whose reversed_amount disagrees with the reversals that point at them.
    (
        _REVERSAL_VIOLATIONS,
        lambda r: (
            f"transaction {r.id}: reversed_amount {r.reversed_amount}, reversals sum {r.reversed}"
        ),
    ),
    # Payments whose refunded_amount disagrees with their refunds.
    (
        _REFUND_VIOLATIONS,
        lambda r: f"payment {r.id}: refunded_amount {r.refunded_amount}, refunds sum {r.refunded}",
    ),
    (
        _DUPLICATE_ACTIVE_CUSTOMERS,
        lambda r: f"customer {r.customer} has {r.n} ACTIVE accounts in {r.program_id}",
    ),
    (
        _MERGED_ACCOUNT_VIOLATIONS,
        lambda r: f"merged account {r.id} still holds {r.balance} / {r.lifetime_points}",
    ),
    (
        _HELD_VIOLATIONS,
        lambda r: f"account {r.id}: held_points {r.held_points}, its HELD holds hold {r.held}",
    ),
    (
        _CAPTURE_VIOLATIONS,
        lambda r: (
            f"hold {r.id}: captured {r.captured_amount}, with {r.redeems} REDEEMs of it"
            f" (its own of {r.redeemed})"
        ),
    ),
]


# HELD holds whose time was up before `before`: a job that has run since would have recorded
# their expiry.
_UNRECORDED_EXPIRIES = compiled(
    sa.text("""
    SELECT id, expire_time FROM points_holds
    WHERE status = 'HELD' AND expire_time < :before
    ORDER BY expire_time
    """)
)


async def unrecorded_expiries(conn: Conn, before: datetime) -> list[Row]:
    cursor = await conn.execute(_UNRECORDED_EXPIRIES, {"before": before})
    return await cursor.fetchall()


async def violations(conn: Conn) -> list[str]:
    """A line for each row that breaks one of the invariants above, check by check."""
    found = []
    for sql, line in _VIOLATIONS:
        found += [line(r) for r in await _all(conn, sql)]
    return found


async def points_after_chains(conn: Conn) -> AsyncIterator[Row]:
    """Streams the chain entries row by row, so a large ledger is never held in memory."""
    async for row in conn.cursor().stream(_CHAIN_ENTRIES):
        yield row


async def account_balances(conn: Conn) -> dict[str, tuple[AccountStatus, int]]:
    return {r.id: (AccountStatus(r.status), r.balance) for r in await _all(conn, _ACCOUNT_BALANCES)}
