"""Invariant checks; each query returns the rows that break one."""

from __future__ import annotations

from collections.abc import AsyncIterator

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


_reversal = _ptx.alias("reversal")


_reversal_sums = (
    sa.select(_reversal.c.reverses_id, sa.func.sum(_reversal.c.amount).label("reversed"))
    .where(_reversal.c.reverses_id.is_not(None))
    .group_by(_reversal.c.reverses_id)
    .subquery()
)


_REVERSAL_VIOLATIONS = compiled(
    sa.select(_ptx.c.id, _ptx.c.reversed_amount, _reversal_sums.c.reversed)
    .select_from(_ptx.outerjoin(_reversal_sums, _reversal_sums.c.reverses_id == _ptx.c.id))
    .where(_ptx.c.reversed_amount != sa.func.coalesce(_reversal_sums.c.reversed, const(0)))
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


_refund_sums = (
    sa.select(refunds.c.payment_id, sa.func.sum(refunds.c.amount).label("refunded"))
    .group_by(refunds.c.payment_id)
    .subquery()
)


_REFUND_VIOLATIONS = compiled(
    sa.select(payments.c.id, payments.c.refunded_amount, _refund_sums.c.refunded)
    .select_from(payments.outerjoin(_refund_sums, _refund_sums.c.payment_id == payments.c.id))
    .where(payments.c.refunded_amount != sa.func.coalesce(_refund_sums.c.refunded, const(0)))
)


_ACCOUNT_BALANCES = compiled(sa.select(accounts.c.id, accounts.c.status, accounts.c.balance))


async def _all(conn: Conn, sql: str) -> list[Row]:
    cursor = await conn.execute(sql)
    return await cursor.fetchall()


async def balance_violations(conn: Conn) -> list[str]:
    """Accounts whose cached totals disagree with their ledger."""
    return [
        f"account {r.id}: balance {r.balance} / lifetime {r.lifetime_points}, ledger says"
        f" {r.ledger_balance} / {r.ledger_lifetime}"
        for r in await _all(conn, _BALANCE_VIOLATIONS)
    ]


async def reversal_violations(conn: Conn) -> list[str]:
    """Transactions whose reversed_amount disagrees with the reversals that point at them."""
    return [
        f"transaction {r.id}: reversed_amount {r.reversed_amount}, reversals sum {r.reversed}"
        for r in await _all(conn, _REVERSAL_VIOLATIONS)
    ]


async def refund_violations(conn: Conn) -> list[str]:
    """Payments whose refunded_amount disagrees with their refunds."""
    return [
        f"payment {r.id}: refunded_amount {r.refunded_amount}, refunds sum {r.refunded}"
        for r in await _all(conn, _REFUND_VIOLATIONS)
    ]


async def duplicate_active_customers(conn: Conn) -> list[str]:
    return [
        f"customer {r.customer} has {r.n} ACTIVE accounts in {r.program_id}"
        for r in await _all(conn, _DUPLICATE_ACTIVE_CUSTOMERS)
    ]


async def merged_account_violations(conn: Conn) -> list[str]:
    return [
        f"merged account {r.id} still holds {r.balance} / {r.lifetime_points}"
        for r in await _all(conn, _MERGED_ACCOUNT_VIOLATIONS)
    ]


async def points_after_chains(conn: Conn) -> AsyncIterator[Row]:
    """Streams the chain entries row by row, so a large ledger is never held in memory."""
    async for row in conn.cursor().stream(_CHAIN_ENTRIES):
        yield row


async def account_balances(conn: Conn) -> dict[str, tuple[AccountStatus, int]]:
    return {r.id: (AccountStatus(r.status), r.balance) for r in await _all(conn, _ACCOUNT_BALANCES)}
