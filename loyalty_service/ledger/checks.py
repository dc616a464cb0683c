"""The ledger's invariants, checked in one snapshot (`loyalty-service check`)."""

from __future__ import annotations

from psycopg import IsolationLevel
from psycopg_pool import AsyncConnectionPool

from .. import store
from ..domain.accounts import AccountStatus
from ..store.sql import Conn


async def find_violations(pool: AsyncConnectionPool) -> list[str]:
    """Checks the ledger's invariants; returns one line per violation.

    - balance == sum(credits) - sum(debits), lifetime_points == sum(EARN and ADJUST credits);
    - each reversed_amount equals the sum of the reversals that point at it;
    - each payment's refunded_amount equals the sum of its refunds (and, by a check
      constraint, is at most its amount);
    - every points_after equals the running balance of the account it was posted to
      (a merge adds the source's balance to its target's running balance);
    - MERGED accounts hold nothing; no customer has two ACTIVE accounts in a program.
    """
    async with pool.connection() as conn:
        # One snapshot for every query, so a ledger that is being written to checks clean.
        await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)
        try:
            async with conn.transaction():
                return await _violations(conn)
        finally:
            await conn.set_isolation_level(IsolationLevel.READ_COMMITTED)


async def _violations(conn: Conn) -> list[str]:
    found = await store.checks.violations(conn)
    balances = await store.checks.account_balances(conn)
    chain_account, running = None, 0
    async for entry in store.checks.points_after_chains(conn):
        if entry.account_id != chain_account:
            found += _chain_end(chain_account, running, balances)
            chain_account, running = entry.account_id, 0
        running += entry.signed_amount
        if entry.points_after is not None and entry.points_after != running:
            found.append(
                f"transaction {entry.id}: points_after {entry.points_after},"
                f" running balance {running}"
            )
    found += _chain_end(chain_account, running, balances)
    return found


def _chain_end(
    account_id: str | None, running: int, balances: dict[str, tuple[AccountStatus, int]]
) -> list[str]:
    if account_id is None:
        return []
    status, balance = balances[account_id]
    if status is not AccountStatus.MERGED and running != balance:
        return [f"account {account_id}: chain ends at {running}, balance is {balance}"]
    return []
