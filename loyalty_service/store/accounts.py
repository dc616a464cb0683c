"""Accounts: rows, locks, pages and merges."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import sqlalchemy as sa
from psycopg import errors as pg_errors
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..db import account_merges, accounts, points_transactions
from ..domain.accounts import Account, AccountFilter, AccountStatus
from ..domain.ids import Page
from .rows import ACCOUNT_COLUMNS, ACCOUNT_COLUMNS_AT, account_of, account_params
from .sql import Conn, bind, compiled, const, filtered_page, one

ACTIVE_CUSTOMER_INDEX = "uq_accounts_active_customer"


class ActiveCustomerTaken(Exception):
    """The unique index refused a second ACTIVE account for one (program, customer)."""


_ACCOUNT_ID = sa.bindparam("id", type_=sa.Text)


# What an account's writes set: not its held points, which only the hold functions and the
# kernel change (migration 0011).
_WRITTEN_COLUMNS = [c for c in ACCOUNT_COLUMNS if c.name != "held_points"]


INSERT_ACCOUNT = compiled(
    pg_insert(accounts)
    .values({c.name: bind(c) for c in _WRITTEN_COLUMNS})
    .on_conflict_do_nothing(
        index_elements=["program_id", "customer"],
        # A literal predicate: partial-index inference cannot match a bound parameter.
        index_where=sa.text("status = 'ACTIVE'"),
    )
    .returning(accounts.c.id)
)


# The customer's ACTIVE account in a program (at most one: uq_accounts_active_customer).
_ACTIVE_OF_CUSTOMER = (
    accounts.c.program_id == bind(accounts.c.program_id),
    accounts.c.customer == bind(accounts.c.customer),
    accounts.c.status == const("ACTIVE"),
)


_FIND_ACTIVE_ACCOUNT = compiled(sa.select(accounts.c.id).where(*_ACTIVE_OF_CUSTOMER))


_SELECT_ACCOUNT = sa.select(*ACCOUNT_COLUMNS_AT).where(accounts.c.id == _ACCOUNT_ID)


_GET_ACCOUNT = compiled(_SELECT_ACCOUNT)


_LOCK_ACCOUNT = compiled(_SELECT_ACCOUNT.with_for_update())


_LOCK_ACCOUNTS = compiled(
    sa.select(*ACCOUNT_COLUMNS_AT)
    .where(accounts.c.id == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Text))))
    .order_by(accounts.c.id)
    .with_for_update()
)


_SAVE_ACCOUNT = compiled(
    sa.update(accounts)
    .where(accounts.c.id == _ACCOUNT_ID)
    .values(
        {
            c.name: bind(c)
            for c in _WRITTEN_COLUMNS
            if c.name not in ("id", "program_id", "create_time")
        }
    )
)


LOCK_ACTIVE_ACCOUNT = compiled(
    sa.select(*ACCOUNT_COLUMNS_AT).where(*_ACTIVE_OF_CUSTOMER).with_for_update()
)


# Where a customer's accounts that are not ACTIVE lead: a CLOSED one is itself; a MERGED one
# leads along merged_into to its survivor (merges can chain: A into B, later B into C). An
# ACTIVE survivor comes first.
FORMER_ACCOUNT = compiled(
    sa.text("""
    WITH RECURSIVE chain (id, status, merged_into, depth) AS (
        SELECT id, status, merged_into, 0 FROM accounts
        WHERE program_id = :program_id AND customer = :customer AND status <> 'ACTIVE'
      UNION ALL
        SELECT a.id, a.status, a.merged_into, chain.depth + 1
        FROM chain JOIN accounts AS a ON a.id = chain.merged_into
        WHERE chain.depth < 1000
    )
    SELECT id, status FROM chain WHERE status <> 'MERGED'
    ORDER BY status = 'ACTIVE' DESC, id
    LIMIT 1
    """)
)


async def lock_active_account(
    conn: Conn, program: str, customer: str, now: datetime
) -> Account | None:
    """The customer's ACTIVE account in the program, locked (FOR UPDATE), if there is one."""
    params = {"program_id": program, "customer": customer, "now": now}
    row = await one(conn, LOCK_ACTIVE_ACCOUNT, params)
    return account_of(row) if row else None


async def former_account(
    conn: Conn, program: str, customer: str
) -> tuple[str, AccountStatus] | None:
    """For a customer with no ACTIVE account in the program: the ACTIVE account one of theirs
    was merged into, else a CLOSED one of theirs, else None (see FORMER_ACCOUNT)."""
    row = await one(conn, FORMER_ACCOUNT, {"program_id": program, "customer": customer})
    return (row.id, AccountStatus(row.status)) if row else None


async def insert_account(conn: Conn, account: Account) -> bool:
    """Inserts the account; False if the customer already has an ACTIVE one in the program.

    A concurrent insert for the same customer waits on the unique index until the first
    commits, so exactly one of any number of racing creates succeeds.
    """
    return await one(conn, INSERT_ACCOUNT, account_params(account)) is not None


async def find_active_account(conn: Conn, program: str, customer: str) -> str | None:
    row = await one(conn, _FIND_ACTIVE_ACCOUNT, {"program_id": program, "customer": customer})
    return row.id if row else None


# Accounts are read as of `now` (ACCOUNT_COLUMNS_AT): what they hold then.


async def get_account(conn: Conn, account_id: str, now: datetime) -> Account | None:
    row = await one(conn, _GET_ACCOUNT, {"id": account_id, "now": now})
    return account_of(row) if row else None


async def lock_account(conn: Conn, account_id: str, now: datetime) -> Account | None:
    row = await one(conn, _LOCK_ACCOUNT, {"id": account_id, "now": now})
    return account_of(row) if row else None


async def lock_accounts(
    conn: Conn, account_ids: Iterable[str], now: datetime
) -> dict[str, Account]:
    """Locks the accounts' rows, always in id order, so two transactions that lock the same
    accounts can never wait on each other in a cycle."""
    params = {"ids": sorted(set(account_ids)), "now": now}
    cursor = await conn.execute(_LOCK_ACCOUNTS, params)
    return {row.id: account_of(row) for row in await cursor.fetchall()}


async def save_account(conn: Conn, account: Account) -> None:
    """Writes a locked account's changed state.

    Raises ActiveCustomerTaken (leaving the transaction usable) when the change would give
    the customer a second ACTIVE account in the program.
    """
    try:
        # A savepoint, so the transaction survives a refusal; the inner pipeline block makes
        # the refusal surface here, inside it, also when the caller is pipelining.
        async with conn.transaction(), conn.pipeline():
            await conn.execute(_SAVE_ACCOUNT, account_params(account))
    except pg_errors.UniqueViolation as error:
        if error.diag.constraint_name == ACTIVE_CUSTOMER_INDEX:
            raise ActiveCustomerTaken from None
        raise


async def list_accounts(
    conn: Conn, where: AccountFilter, after: int | None, limit: int, now: datetime
) -> Page[Account]:
    filters = {
        "program_id": where.program or where.programs,
        "customer": where.customer,
        "status": where.status.value if where.status else None,
    }
    columns = ACCOUNT_COLUMNS_AT
    params = {"now": now}
    return await filtered_page(conn, accounts, columns, filters, after, limit, account_of, params)


_LAST_TRANSACTION_SEQ = compiled(
    sa.select(
        sa.func.coalesce(sa.func.max(points_transactions.c.seq), const(0)).label("seq")
    ).where(
        points_transactions.c.account_id
        == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Text)))
    )
)


_REPARENT_TRANSACTIONS = compiled(
    sa.update(points_transactions)
    .where(points_transactions.c.account_id == sa.bindparam("source", type_=sa.Text))
    .values(
        account_id=sa.bindparam("target", type_=sa.Text),
        original_account_id=sa.func.coalesce(
            points_transactions.c.original_account_id, sa.bindparam("source", type_=sa.Text)
        ),
    )
)


_RECORD_MERGE = compiled(
    sa.insert(account_merges).values({c.name: bind(c) for c in account_merges.c})
)


async def last_transaction_seq(conn: Conn, account_ids: Iterable[str]) -> int:
    row = await one(conn, _LAST_TRANSACTION_SEQ, {"ids": list(account_ids)})
    assert row is not None
    return row.seq


async def reparent_transactions(conn: Conn, source: str, target: str) -> None:
    await conn.execute(_REPARENT_TRANSACTIONS, {"source": source, "target": target})


async def record_merge(
    conn: Conn, source: Account, target: str, after_seq: int, now: datetime, actor: str
) -> None:
    await conn.execute(
        _RECORD_MERGE,
        {
            "source_id": source.id,
            "target_id": target,
            "balance_moved": source.balance,
            "lifetime_moved": source.lifetime_points,
            "after_seq": after_seq,
            "create_time": now,
            "actor": actor,
        },
    )
