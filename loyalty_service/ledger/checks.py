"""The ledger's invariants, checked in one snapshot (`loyalty-service check`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from psycopg import IsolationLevel
from psycopg_pool import AsyncConnectionPool

from .. import store
from ..domain.accounts import AccountStatus
from ..store.sql import Conn

# How long after a hold's time is up its expiry may still be unrecorded before the check
# calls it a violation: the expiry job runs every second, on one replica.
EXPIRY_GRACE = timedelta(minutes=5)


async def find_violations(
    pool: AsyncConnectionPool, expiry_grace: timedelta = EXPIRY_GRACE
) -> list[str]:
    """Checks the ledger's invariants; returns one line per violation.

    - balance == sum(credits) - sum(debits), lifetime_points == sum(EARN and ADJUST credits);
    - each reversed_amount equals the sum of the reversals that point at it;
    - each payment's refunded_amount equals the sum of its refunds (and, by a check
      constraint, is at most its amount);
    - every points_after equals the running balance of the account it was posted to
      (a merge adds the source's balance to its target's running balance);
    - MERGED accounts hold nothing; no customer has two ACTIVE accounts in a program;
    - held_points equals the sum of the account's HELD holds; every CAPTURED hold has
      exactly one REDEEM, of its captured amount; no hold whose time was up more than
      `expiry_grace` ago is still counted as held (the expiry job has run since).
    """
    async with pool.connection() as conn:
        # One snapshot for every query, so a ledger that is being written to checks clean.
        await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)
        try:
            async with conn.transaction():
                return await _violations(conn, expiry_grace)
        finally:
            await conn.set_isolation_level(IsolationLevel.READ_COMMITTED)


async def _violations(conn: Conn, expiry_grace: timedelta) -> list[str]:
    found = await store.checks.violations(conn)
    before = datetime.now(UTC) - expiry_grace
    for row in await store.checks.unrecorded_expiries(conn, before):
        found.append(f"hold {row.id}: expired at {row.expire_time.isoformat()}, still HELD")
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
