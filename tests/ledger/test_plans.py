"""Statements that PostgreSQL plans once per session find their rows by key, however small
the table was when they were planned: the kernel's account lock and update, and the look-up
of a customer's former accounts (a new member's first payment). Planned on a near-empty
table and run after it grew, each reads a handful of account rows, not every one."""

from __future__ import annotations

import asyncio

from loyalty_service import db, store
from loyalty_service.domain.callers import ANYONE
from loyalty_service.domain.points import Direction, TransactionType
from loyalty_service.domain.programs import NewProgram
from loyalty_service.ledger import Ledger
from tests.ledger.test_kernel import posting

GROWN = 3_000  # accounts added after the statements were planned
PLANNED = 12  # calls on the small table: past psycopg's and PostgreSQL's plan caching


async def _grow(conn, program: str) -> None:
    await conn.execute(
        "INSERT INTO accounts (id, program_id, customer, status, balance, lifetime_points,"
        " tier, metadata, create_time, update_time)"
        " SELECT 'loy_grown' || n, %s, 'cust_grown' || n, 'ACTIVE', 0, 0, '', '{}', now(),"
        " now() FROM generate_series(1, %s) AS n",
        [program, GROWN],
    )


async def _accounts_read(conn) -> int:
    """The account rows this transaction has read so far, by scan or through an index."""
    cursor = await conn.execute(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) AS n"
        " FROM pg_stat_xact_user_tables WHERE relname = 'accounts'"
    )
    return (await cursor.fetchone()).n


def _on_one_connection(url: str, scenario) -> None:
    async def main() -> None:
        # One connection: the statements run where they were planned.
        async with db.create_pool(url, size=1) as pool:
            await scenario(Ledger(pool), pool)

    asyncio.run(main())


def test_the_kernel_reads_only_the_accounts_it_posts_to(databases):
    url = databases.create()

    async def scenario(ledger: Ledger, pool) -> None:
        program = await ledger.create_program(ANYONE, None, NewProgram("Small", "EUR"))
        account = (await ledger.create_account(ANYONE, program.id, None, {})).id
        earn = (account, TransactionType.EARN, Direction.CREDIT, 1)
        async with db.connection(pool) as conn:
            for _ in range(PLANNED):
                await store.postings.post(conn, [posting(*earn)])
            await _grow(conn, program.id)
            async with conn.transaction():
                before = await _accounts_read(conn)
                done = await store.postings.post(conn, [posting(*earn)])
                read = await _accounts_read(conn) - before
        assert [d.result for d in done] == ["POSTED"]
        assert read <= 4, f"the kernel read {read} account rows to post to one"
        assert (await ledger.get_account(ANYONE, account)).balance == PLANNED + 1

    _on_one_connection(url, scenario)


def test_a_customers_former_accounts_are_found_without_reading_the_programs(databases):
    url = databases.create()

    async def scenario(ledger: Ledger, pool) -> None:
        program = await ledger.create_program(ANYONE, None, NewProgram("Small", "EUR"))
        async with db.connection(pool) as conn:
            for n in range(PLANNED):
                assert await store.accounts.former_account(conn, program.id, f"c{n}") is None
            await _grow(conn, program.id)
            async with conn.transaction():
                before = await _accounts_read(conn)
                former = await store.accounts.former_account(conn, program.id, "cust_new")
                read = await _accounts_read(conn) - before
        assert former is None
        assert read <= 4, f"looking for a new customer's former accounts read {read} rows"

    _on_one_connection(url, scenario)
