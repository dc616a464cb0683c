"""All SQL: row locks, ledger entries, keyset pages, idempotency keys, invariant checks.

Statements are written with SQLAlchemy Core against the tables in db.py and compiled once,
at import, to psycopg's `%(name)s` form; they run on psycopg connections from the pool. So
the hot path pays neither statement construction nor compilation per call, and psycopg
prepares each statement on the server after a few uses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime

import sqlalchemy as sa
from psycopg import AsyncConnection
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .db import (
    account_merges,
    accounts,
    earning_rule_versions,
    event_log_head,
    events,
    idempotency_keys,
    payments,
    points_transactions,
    programs,
    refunds,
    service_settings,
)
from .domain import (
    Account,
    AccountFilter,
    AccountStatus,
    Change,
    Direction,
    EarningRule,
    Event,
    EventFilter,
    EventType,
    NewPayment,
    NewRefund,
    OriginKind,
    Page,
    PointsTransaction,
    Program,
    ProgramStatus,
    Tier,
    TransactionFilter,
    TransactionType,
    as_posted,
    new_id,
)

T = typing.TypeVar("T")
Conn = AsyncConnection[typing.Any]
Row = typing.Any  # psycopg's namedtuple rows

ACTIVE_CUSTOMER_INDEX = "uq_accounts_active_customer"
_DIALECT = postgresql.psycopg.dialect()


def _sql(statement: sa.ClauseElement) -> str:
    return str(statement.compile(dialect=_DIALECT))


def _bind(column: sa.Column) -> sa.BindParameter:
    return sa.bindparam(column.name, type_=column.type)


def _const(value: str | int) -> sa.ColumnElement:
    """A constant written into the SQL. A plain Python value would become a parameter with
    no name of ours; a literal also lets the planner match partial indexes."""
    return sa.literal_column(f"'{value}'" if isinstance(value, str) else str(int(value)))


class ActiveCustomerTaken(Exception):
    """The unique index refused a second ACTIVE account for one (program, customer)."""


# ---------------------------------------------------------------------------------------
# Rows <-> domain objects.

_ACCOUNT_COLUMNS = [c for c in accounts.c if c.name != "seq"]
_TRANSACTION_COLUMNS = [c for c in points_transactions.c if c.name != "seq"]


def _account(row: Row) -> Account:
    return Account(
        id=row.id,
        program=row.program_id,
        customer=row.customer,
        status=AccountStatus(row.status),
        balance=row.balance,
        lifetime_points=row.lifetime_points,
        tier=row.tier,
        metadata=row.metadata,
        create_time=row.create_time,
        update_time=row.update_time,
        merged_into=row.merged_into,
        version=row.version,
    )


def _transaction(row: Row) -> PointsTransaction:
    return PointsTransaction(
        id=row.id,
        account=row.account_id,
        type=TransactionType(row.type),
        direction=Direction(row.direction),
        amount=row.amount,
        points_after=row.points_after,
        reason=row.reason,
        origin_kind=OriginKind(row.origin_kind),
        origin_id=row.origin_id,
        metadata=row.metadata,
        create_time=row.create_time,
        reverses=row.reverses_id,
        original_account=row.original_account_id,
        reversed_amount=row.reversed_amount,
        rule=row.rule_id,
        rule_version=row.rule_version,
    )


def _account_params(account: Account) -> dict[str, object]:
    return {
        "id": account.id,
        "program_id": account.program,
        "customer": account.customer,
        "status": account.status.value,
        "balance": account.balance,
        "lifetime_points": account.lifetime_points,
        "tier": account.tier,
        "metadata": Jsonb(account.metadata),
        "create_time": account.create_time,
        "update_time": account.update_time,
        "merged_into": account.merged_into,
        "version": account.version,
    }


def _transaction_params(ptx: PointsTransaction) -> dict[str, object]:
    return {
        "id": ptx.id,
        "account_id": ptx.account,
        "original_account_id": ptx.original_account,
        "type": ptx.type.value,
        "direction": ptx.direction.value,
        "amount": ptx.amount,
        "points_after": ptx.points_after,
        "reason": ptx.reason,
        "origin_kind": ptx.origin_kind.value,
        "origin_id": ptx.origin_id,
        "reverses_id": ptx.reverses,
        "reversed_amount": ptx.reversed_amount,
        "metadata": Jsonb(ptx.metadata),
        "create_time": ptx.create_time,
        "rule_id": ptx.rule,
        "rule_version": ptx.rule_version,
    }


async def _one(conn: Conn, sql: str, params: dict[str, object]) -> Row | None:
    cursor = await conn.execute(sql, params)
    return await cursor.fetchone()


# ---------------------------------------------------------------------------------------
# Programs and settings.

_PROGRAM_COLUMNS = [c for c in programs.c if c.name != "seq"]
_PROGRAM_ID = sa.bindparam("id", type_=sa.Text)
_INSERT_PROGRAM = _sql(
    pg_insert(programs)
    .values({c.name: _bind(c) for c in _PROGRAM_COLUMNS})
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(programs.c.id)
)
_GET_PROGRAM = _sql(sa.select(*_PROGRAM_COLUMNS).where(programs.c.id == _PROGRAM_ID))
_LOCK_PROGRAM = _sql(
    sa.select(*_PROGRAM_COLUMNS).where(programs.c.id == _PROGRAM_ID).with_for_update()
)
# KEY SHARE, as the accounts' foreign key takes anyway: enrollments do not wait for each
# other, but wait for an UpdateProgram (FOR UPDATE) and then see what it committed.
_SHARE_PROGRAM = _sql(
    sa.select(*_PROGRAM_COLUMNS)
    .where(programs.c.id == _PROGRAM_ID)
    .with_for_update(read=True, key_share=True)
)
_SAVE_PROGRAM = _sql(
    sa.update(programs)
    .where(programs.c.id == _PROGRAM_ID)
    .values({c.name: _bind(c) for c in _PROGRAM_COLUMNS if c.name not in ("id", "create_time")})
)
_PROGRAM_HAS_ACCOUNTS = _sql(
    sa.select(
        sa.exists().where(accounts.c.program_id == _bind(accounts.c.program_id)).label("found")
    )
)
_PAGE_TOKEN_KEY = _sql(
    sa.select(service_settings.c.value).where(service_settings.c.name == _const("page_token_key"))
)


def _program(row: Row) -> Program:
    return Program(
        id=row.id,
        name=row.name,
        currency=row.currency,
        auto_enroll=row.auto_enroll,
        tiers=[Tier(t["name"], int(t["lifetime_points"])) for t in row.tiers],
        status=ProgramStatus(row.status),
        create_time=row.create_time,
        update_time=row.update_time,
        earning_rules=from_json(list[EarningRule], row.earning_rules),
    )


def _program_params(program: Program) -> dict[str, object]:
    return {
        "id": program.id,
        "name": program.name,
        "currency": program.currency,
        "auto_enroll": program.auto_enroll,
        "tiers": Jsonb([to_json(tier) for tier in program.tiers]),
        "status": program.status.value,
        "create_time": program.create_time,
        "update_time": program.update_time,
        "earning_rules": Jsonb(to_json(program.earning_rules)),
    }


async def insert_program(conn: Conn, program: Program) -> bool:
    """Inserts the program; False if one with its id exists (a racing insert of the same id
    waits for the first to commit, and then gets False)."""
    return await _one(conn, _INSERT_PROGRAM, _program_params(program)) is not None


async def get_program(conn: Conn, program_id: str) -> Program | None:
    row = await _one(conn, _GET_PROGRAM, {"id": program_id})
    return _program(row) if row else None


async def lock_program(conn: Conn, program_id: str) -> Program | None:
    row = await _one(conn, _LOCK_PROGRAM, {"id": program_id})
    return _program(row) if row else None


async def share_program(conn: Conn, program_id: str) -> Program | None:
    """The program, held against UpdateProgram until this transaction ends (see
    _SHARE_PROGRAM)."""
    row = await _one(conn, _SHARE_PROGRAM, {"id": program_id})
    return _program(row) if row else None


async def save_program(conn: Conn, program: Program) -> None:
    await conn.execute(_SAVE_PROGRAM, _program_params(program))


_INSERT_RULE_VERSIONS = _sql(
    sa.text("""
    INSERT INTO earning_rule_versions (rule_id, version, program_id, rule, create_time)
    SELECT r.rule ->> 'id', CAST(r.rule ->> 'version' AS int), :program_id, r.rule, :create_time
    FROM jsonb_array_elements(:rules) AS r(rule)
    ON CONFLICT DO NOTHING
    """)
)
_rule_version = earning_rule_versions.c
_GET_RULE_VERSION = _sql(
    sa.select(_rule_version.rule)
    .where(_rule_version.rule_id == _bind(_rule_version.rule_id))
    .order_by(_rule_version.version.desc())
    .limit(_const(1))
)
_GET_RULE_VERSION_OF = _sql(
    sa.select(_rule_version.rule).where(
        _rule_version.rule_id == _bind(_rule_version.rule_id),
        _rule_version.version == _bind(_rule_version.version),
    )
)


async def save_rule_versions(
    conn: Conn, program_id: str, rules: list[EarningRule], now: datetime
) -> None:
    """Keeps the rules' versions (those already kept stay as they were)."""
    params = {"program_id": program_id, "rules": Jsonb(to_json(rules)), "create_time": now}
    await conn.execute(_INSERT_RULE_VERSIONS, params)


async def get_rule_version(conn: Conn, rule_id: str, version: int | None) -> EarningRule | None:
    """A version of a rule, or its latest (also of a rule since removed) when None."""
    if version is None:
        row = await _one(conn, _GET_RULE_VERSION, {"rule_id": rule_id})
    else:
        row = await _one(conn, _GET_RULE_VERSION_OF, {"rule_id": rule_id, "version": version})
    return from_json(EarningRule, row.rule) if row else None


async def program_has_accounts(conn: Conn, program_id: str) -> bool:
    row = await _one(conn, _PROGRAM_HAS_ACCOUNTS, {"program_id": program_id})
    assert row is not None
    return bool(row.found)


@functools.cache
def _list_programs_sql(status: bool, after: bool) -> str:
    statement = sa.select(*_PROGRAM_COLUMNS, programs.c.seq)
    if status:
        statement = statement.where(programs.c.status == _bind(programs.c.status))
    return _sql(_keyset(statement, programs.c.seq, after))


async def list_programs(
    conn: Conn, status: ProgramStatus | None, after: int | None, limit: int
) -> Page[Program]:
    sql = _list_programs_sql(status is not None, after is not None)
    params = {
        "status": status.value if status else None,
        "after": after,
        "limit": limit + 1,
    }
    cursor = await conn.execute(sql, params)
    return _page(await cursor.fetchall(), limit, _program)


async def page_token_key(conn: Conn) -> bytes:
    row = await _one(conn, _PAGE_TOKEN_KEY, {})
    assert row is not None, "the page token key is created by migration 0001"
    return row.value.encode()


# ---------------------------------------------------------------------------------------
# Accounts.

_ACCOUNT_ID = sa.bindparam("id", type_=sa.Text)
_INSERT_ACCOUNT = _sql(
    pg_insert(accounts)
    .values({c.name: _bind(c) for c in _ACCOUNT_COLUMNS})
    .on_conflict_do_nothing(
        index_elements=["program_id", "customer"],
        # A literal predicate: partial-index inference cannot match a bound parameter.
        index_where=sa.text("status = 'ACTIVE'"),
    )
    .returning(accounts.c.id)
)
# The customer's ACTIVE account in a program (at most one: uq_accounts_active_customer).
_ACTIVE_OF_CUSTOMER = (
    accounts.c.program_id == _bind(accounts.c.program_id),
    accounts.c.customer == _bind(accounts.c.customer),
    accounts.c.status == _const("ACTIVE"),
)
_FIND_ACTIVE_ACCOUNT = _sql(sa.select(accounts.c.id).where(*_ACTIVE_OF_CUSTOMER))
_GET_ACCOUNT = _sql(sa.select(*_ACCOUNT_COLUMNS).where(accounts.c.id == _ACCOUNT_ID))
_LOCK_ACCOUNT = _sql(
    sa.select(*_ACCOUNT_COLUMNS).where(accounts.c.id == _ACCOUNT_ID).with_for_update()
)
_LOCK_ACCOUNTS = _sql(
    sa.select(*_ACCOUNT_COLUMNS)
    .where(accounts.c.id == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Text))))
    .order_by(accounts.c.id)
    .with_for_update()
)
_SAVE_ACCOUNT = _sql(
    sa.update(accounts)
    .where(accounts.c.id == _ACCOUNT_ID)
    .values(
        {
            c.name: _bind(c)
            for c in _ACCOUNT_COLUMNS
            if c.name not in ("id", "program_id", "create_time")
        }
    )
)


_LOCK_ACTIVE_ACCOUNT = _sql(
    sa.select(*_ACCOUNT_COLUMNS).where(*_ACTIVE_OF_CUSTOMER).with_for_update()
)
# Where a customer's accounts that are not ACTIVE lead: a CLOSED one is itself; a MERGED one
# leads along merged_into to its survivor (merges can chain: A into B, later B into C). An
# ACTIVE survivor comes first.
_FORMER_ACCOUNT = _sql(
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
_SAVE_POSTED = _sql(
    sa.update(accounts)
    .where(accounts.c.id == _ACCOUNT_ID)
    .values(
        {
            c.name: _bind(c)
            for c in _ACCOUNT_COLUMNS
            if c.name in ("balance", "lifetime_points", "tier", "update_time", "version")
        }
    )
)


async def lock_active_account(conn: Conn, program: str, customer: str) -> Account | None:
    """The customer's ACTIVE account in the program, locked (FOR UPDATE), if there is one."""
    row = await _one(conn, _LOCK_ACTIVE_ACCOUNT, {"program_id": program, "customer": customer})
    return _account(row) if row else None


async def former_account(
    conn: Conn, program: str, customer: str
) -> tuple[str, AccountStatus] | None:
    """For a customer with no ACTIVE account in the program: the ACTIVE account one of theirs
    was merged into, else a CLOSED one of theirs, else None (see _FORMER_ACCOUNT)."""
    row = await _one(conn, _FORMER_ACCOUNT, {"program_id": program, "customer": customer})
    return (row.id, AccountStatus(row.status)) if row else None


async def save_posted(conn: Conn, account: Account) -> None:
    """Writes what postings change of a locked account: its totals, tier, version and time."""
    await conn.execute(_SAVE_POSTED, _account_params(account))


async def insert_account(conn: Conn, account: Account) -> bool:
    """Inserts the account; False if the customer already has an ACTIVE one in the program.

    A concurrent insert for the same customer waits on the unique index until the first
    commits, so exactly one of any number of racing creates succeeds.
    """
    return await _one(conn, _INSERT_ACCOUNT, _account_params(account)) is not None


async def find_active_account(conn: Conn, program: str, customer: str) -> str | None:
    row = await _one(conn, _FIND_ACTIVE_ACCOUNT, {"program_id": program, "customer": customer})
    return row.id if row else None


async def get_account(conn: Conn, account_id: str) -> Account | None:
    row = await _one(conn, _GET_ACCOUNT, {"id": account_id})
    return _account(row) if row else None


async def lock_account(conn: Conn, account_id: str) -> Account | None:
    row = await _one(conn, _LOCK_ACCOUNT, {"id": account_id})
    return _account(row) if row else None


async def lock_accounts(conn: Conn, account_ids: Iterable[str]) -> dict[str, Account]:
    """Locks the accounts' rows, always in id order, so two transactions that lock the same
    accounts can never wait on each other in a cycle."""
    cursor = await conn.execute(_LOCK_ACCOUNTS, {"ids": sorted(set(account_ids))})
    return {row.id: _account(row) for row in await cursor.fetchall()}


async def save_account(conn: Conn, account: Account) -> None:
    """Writes a locked account's changed state.

    Raises ActiveCustomerTaken (leaving the transaction usable) when the change would give
    the customer a second ACTIVE account in the program.
    """
    try:
        # A savepoint, so the transaction survives a refusal; the inner pipeline block makes
        # the refusal surface here, inside it, also when the caller is pipelining.
        async with conn.transaction(), conn.pipeline():
            await conn.execute(_SAVE_ACCOUNT, _account_params(account))
    except pg_errors.UniqueViolation as error:
        if error.diag.constraint_name == ACTIVE_CUSTOMER_INDEX:
            raise ActiveCustomerTaken from None
        raise


@functools.cache
def _list_accounts_sql(program: bool, customer: bool, status: bool, after: bool) -> str:
    statement = sa.select(*_ACCOUNT_COLUMNS, accounts.c.seq)
    if program:
        statement = statement.where(accounts.c.program_id == _bind(accounts.c.program_id))
    if customer:
        statement = statement.where(accounts.c.customer == _bind(accounts.c.customer))
    if status:
        statement = statement.where(accounts.c.status == _bind(accounts.c.status))
    return _sql(_keyset(statement, accounts.c.seq, after))


async def list_accounts(
    conn: Conn, where: AccountFilter, after: int | None, limit: int
) -> Page[Account]:
    sql = _list_accounts_sql(
        where.program is not None,
        where.customer is not None,
        where.status is not None,
        after is not None,
    )
    params = {
        "program_id": where.program,
        "customer": where.customer,
        "status": where.status.value if where.status else None,
        "after": after,
        "limit": limit + 1,
    }
    cursor = await conn.execute(sql, params)
    return _page(await cursor.fetchall(), limit, _account)


# ---------------------------------------------------------------------------------------
# Points transactions.

_TRANSACTION_ID = sa.bindparam("id", type_=sa.Text)
_INSERT_TRANSACTION = _sql(
    sa.insert(points_transactions).values({c.name: _bind(c) for c in _TRANSACTION_COLUMNS})
)
_GET_TRANSACTION = _sql(
    sa.select(*_TRANSACTION_COLUMNS).where(points_transactions.c.id == _TRANSACTION_ID)
)
_LOCK_TRANSACTION = _sql(
    sa.select(*_TRANSACTION_COLUMNS)
    .where(points_transactions.c.id == _TRANSACTION_ID)
    .with_for_update()
)
_ADD_REVERSED_AMOUNT = _sql(
    sa.update(points_transactions)
    .where(points_transactions.c.id == _TRANSACTION_ID)
    .values(
        reversed_amount=points_transactions.c.reversed_amount
        + sa.bindparam("amount", type_=sa.BigInteger)
    )
)


def _tier_after_sql(lifetime_delta: str) -> str:
    """The SET expression for an account's tier after a posting adds `lifetime_delta` to its
    lifetime points; it mirrors domain.tier_for: the highest of its program's tiers whose
    threshold the new lifetime points reach, if that ranks above the tier it holds (a tier
    the program no longer has ranks below all). Only a posting that raises lifetime points
    looks at the program's tiers at all; one on a program without tiers finds none."""
    return f"""CASE WHEN {lifetime_delta} > 0 THEN coalesce((
            SELECT reached.tier ->> 'name'
            FROM programs AS p,
                jsonb_array_elements(p.tiers) WITH ORDINALITY AS reached(tier, rank)
            WHERE p.id = accounts.program_id
              AND CAST(reached.tier ->> 'lifetime_points' AS bigint)
                  <= accounts.lifetime_points + {lifetime_delta}
              AND reached.rank > coalesce((
                  SELECT held.rank
                  FROM jsonb_array_elements(p.tiers) WITH ORDINALITY AS held(tier, rank)
                  WHERE held.tier ->> 'name' = accounts.tier), 0)
              -- A held tier the program no longer has gives way only to a threshold this
              -- posting crosses (accounts.lifetime_points is the value before it).
              AND (accounts.tier = ''
                   OR EXISTS (SELECT 1 FROM jsonb_array_elements(p.tiers) AS known(tier)
                              WHERE known.tier ->> 'name' = accounts.tier)
                   OR CAST(reached.tier ->> 'lifetime_points' AS bigint)
                      > accounts.lifetime_points)
            ORDER BY reached.rank DESC LIMIT 1
        ), accounts.tier) ELSE accounts.tier END"""


# The account after an UPDATE, as to_json(Account) writes it: the snapshot of its
# loyalty.account.tier_changed event (read back with from_json).
_ACCOUNT_SNAPSHOT_SQL = """jsonb_build_object('id', accounts.id, 'program', accounts.program_id,
            'customer', accounts.customer, 'status', accounts.status,
            'balance', accounts.balance, 'lifetime_points', accounts.lifetime_points,
            'tier', accounts.tier, 'metadata', accounts.metadata,
            'create_time', accounts.create_time, 'update_time', accounts.update_time,
            'merged_into', accounts.merged_into, 'version', accounts.version)"""
# A tier_changed event's id: drawn from its transaction event's (random) id, in the
# database, so that postings that promote no one draw nothing.
_TIER_EVENT_ID_SQL = "'evt_' || substr(md5({event_id} || '.tier'), 1, 20)"


def _post_transaction_sql(with_request_id: bool) -> str:
    """One statement that posts a transaction: lock the account, change its totals within
    the bounds, promote it to the tier its lifetime points reach, insert the ledger row and,
    with a request id, remember it.

    One round trip and its implicit transaction: the row lock is held only while PostgreSQL
    runs it. With a request id, a response already stored for it is returned instead (and
    nothing changes); if a racing retry stores one first, the key insert fails and the
    whole statement, change included, is undone. The response stored is the transaction's
    id: the ledger row is the response (see domain.as_posted). Written out, because its
    shape is the point.
    """
    prior = (
        "prior AS (SELECT fingerprint, response FROM idempotency_keys WHERE key = :key),"
        if with_request_id
        else ""
    )
    not_replayed = "AND NOT EXISTS (SELECT 1 FROM prior)" if with_request_id else ""
    saved = (
        """, saved AS (
            INSERT INTO idempotency_keys (key, fingerprint, response, create_time)
            SELECT :key, :fingerprint, to_jsonb(CAST(:id AS text)), :create_time
            FROM posted
            RETURNING key
        )"""
        if with_request_id
        else ""
    )
    # The event log's head is the last lock taken (see append_events): after the key's
    # insert, which may wait for a racing retry's. It moves one position for the
    # transaction's event, and one more for its tier_changed event when `moved` says the
    # posting promoted the account (tier_snapshot is set then). No `--` comments in the SQL:
    # the benchmark runs it through pgbench on one line.
    written_last = "saved" if with_request_id else "posted"
    prior_columns = (
        "(SELECT fingerprint FROM prior) AS prior_fingerprint,"
        " (SELECT response FROM prior) AS prior_response,"
        if with_request_id
        else "NULL AS prior_fingerprint, NULL AS prior_response,"
    )
    names = [c.name for c in _ACCOUNT_COLUMNS]
    columns = ", ".join(f"locked.{name}" for name in names)
    return _sql(
        sa.text(f"""
        WITH {prior}
        locked AS (
            SELECT {", ".join(names)} FROM accounts WHERE id = :account_id FOR UPDATE
        ), moved AS (
            UPDATE accounts SET balance = accounts.balance + :delta,
                lifetime_points = accounts.lifetime_points + :lifetime_delta,
                tier = {_tier_after_sql(":lifetime_delta")},
                update_time = :create_time, version = accounts.version + 1
            FROM locked
            WHERE accounts.id = locked.id AND locked.status = 'ACTIVE'
              AND locked.balance + :delta BETWEEN :min_balance AND :max_balance
              {not_replayed}
            RETURNING accounts.balance, accounts.program_id,
                CASE WHEN accounts.tier <> locked.tier THEN {_ACCOUNT_SNAPSHOT_SQL}
                END AS tier_snapshot
        ), posted AS (
            INSERT INTO points_transactions (id, account_id, original_account_id, type,
                direction, amount, points_after, reason, origin_kind, origin_id, reverses_id,
                reversed_amount, metadata, create_time)
            SELECT :id, :account_id, NULL, :type, :direction, :amount, moved.balance, :reason,
                :origin_kind, :origin_id, NULL, 0, :metadata, :create_time
            FROM moved
            RETURNING points_after
        ){saved}, head AS (
            UPDATE event_log_head
            SET position = event_log_head.position + (SELECT 1 + count(tier_snapshot) FROM moved)
            WHERE EXISTS (SELECT 1 FROM {written_last})
            RETURNING position
        ), logged AS (
            INSERT INTO events (position, id, type, create_time, program_id, account_id,
                transaction_id, snapshot)
            SELECT head.position - CAST(moved.tier_snapshot IS NOT NULL AS int), :event_id,
                '{EventType.TRANSACTION_CREATED}', :create_time, moved.program_id, :account_id,
                :id, NULL
            FROM head, moved
            UNION ALL
            SELECT head.position, {_TIER_EVENT_ID_SQL.format(event_id=":event_id")},
                '{EventType.ACCOUNT_TIER_CHANGED}', :create_time, moved.program_id,
                :account_id, NULL, moved.tier_snapshot
            FROM head, moved
            WHERE moved.tier_snapshot IS NOT NULL
        )
        SELECT {prior_columns} (SELECT points_after FROM posted) AS points_after, {columns}
        FROM (SELECT 1) AS one LEFT JOIN locked ON true
        """)
    )


_POST_TRANSACTION = _post_transaction_sql(with_request_id=False)
_POST_TRANSACTION_ONCE = _post_transaction_sql(with_request_id=True)


@dataclass(frozen=True)
class Posted:
    """What the posting statement saw and did."""

    points_after: int | None  # set when the transaction was posted
    # When it was not: the locked account before the change (None if it does not exist) ...
    account: Account | None = None
    # ... and the response stored for the request id, if it had one.
    prior: StoredResponse | None = None


@dataclass(frozen=True)
class NewPosting:
    """A transaction to post (points_after is filled in by the database), the change it makes
    to its account's totals and, for an idempotent request, its (key, fingerprint)."""

    ptx: PointsTransaction
    change: Change
    request: tuple[str, str] | None = None
    # The id of its points_transaction.created event.
    event_id: str = dataclasses.field(default_factory=lambda: new_id("evt_"))


def _posting_values(posting: NewPosting) -> dict[str, typing.Any]:
    """The parameters of one posting, for the single and the batch posting statements."""
    ptx, change = posting.ptx, posting.change
    key, fingerprint = posting.request or (None, None)
    return {
        "id": ptx.id,
        "account_id": ptx.account,
        "type": ptx.type.value,
        "direction": ptx.direction.value,
        "amount": ptx.amount,
        "delta": change.delta,
        "lifetime_delta": change.lifetime_delta,
        "min_balance": change.min_balance,
        "max_balance": change.max_balance,
        "reason": ptx.reason,
        "origin_kind": ptx.origin_kind.value,
        "origin_id": ptx.origin_id,
        "metadata": ptx.metadata,
        "create_time": ptx.create_time,
        "key": key,
        "fingerprint": fingerprint,
        "event_id": posting.event_id,
    }


async def post_transaction(conn: Conn, posting: NewPosting) -> Posted:
    """Posts the transaction (its points_after is filled in by the database) if the locked
    account is ACTIVE and the change keeps its balance within bounds. For an idempotent
    request, the response stored under its key is the transaction's id.

    Raises KeyTaken when a concurrent request stored a response for the key first.
    """
    params = _posting_values(posting)
    params["metadata"] = Jsonb(params["metadata"])
    statement = _POST_TRANSACTION_ONCE if posting.request else _POST_TRANSACTION
    try:
        row = await _one(conn, statement, params)
    except pg_errors.UniqueViolation as error:
        if error.diag.constraint_name == "pk_idempotency_keys":
            raise KeyTaken from None
        raise
    assert row is not None
    if row.points_after is not None:
        return Posted(row.points_after)
    prior = None
    if row.prior_fingerprint is not None:
        prior = StoredResponse(row.prior_fingerprint, row.prior_response)
    return Posted(None, account=_account(row) if row.id is not None else None, prior=prior)


class KeyTaken(Exception):
    """A concurrent request stored its response under the same request key first."""


class BatchNotTaken(Exception):
    """The database refused a batch of postings because of one of them; none was written."""


# The batch form of the posting statement: many postings on distinct accounts in one round
# trip and one commit. The batch goes as one JSON array, which costs the client one dump
# where an array per column would cost one each.
_POST_TRANSACTIONS = _sql(
    sa.text(f"""
    WITH request AS (
        SELECT * FROM jsonb_to_recordset(CAST(:postings AS jsonb)) AS r(
            idx int, id text, account_id text, type text, direction text, amount bigint,
            delta bigint, lifetime_delta bigint, min_balance bigint, max_balance bigint,
            reason text, origin_kind text, origin_id text, metadata jsonb,
            create_time timestamptz, key text, fingerprint text, event_id text)
    ), prior AS (
        SELECT request.idx, k.fingerprint, k.response
        FROM idempotency_keys AS k JOIN request ON request.key = k.key
        WHERE k.key = ANY (ARRAY(SELECT key FROM request))
    ), locked AS (
        -- A row that another transaction holds is skipped, not waited for: its posting is
        -- left for the caller to post alone. So a batch never waits on a row lock (only,
        -- rarely, on another transaction's insert of the same request key).
        SELECT id, status, tier FROM accounts
        WHERE id = ANY (ARRAY(SELECT account_id FROM request))
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        -- The rows are locked: the status and balance compared here are their latest.
        -- (Rows are found by id = ANY (...) on the primary key: a status condition here
        -- once led the planner to scan the whole partial index of ACTIVE accounts.)
        UPDATE accounts SET balance = accounts.balance + request.delta,
            lifetime_points = accounts.lifetime_points + request.lifetime_delta,
            tier = {_tier_after_sql("request.lifetime_delta")},
            update_time = request.create_time, version = accounts.version + 1
        FROM request
        WHERE accounts.id = ANY (ARRAY(SELECT id FROM locked WHERE status = 'ACTIVE'))
          AND accounts.id = request.account_id
          AND accounts.balance + request.delta BETWEEN request.min_balance AND request.max_balance
          AND NOT EXISTS (SELECT 1 FROM prior WHERE prior.idx = request.idx)
        RETURNING request.idx, accounts.balance, accounts.program_id,
            -- Set when the posting promoted the account: its tier_changed snapshot.
            CASE WHEN request.lifetime_delta > 0
                AND accounts.tier <> (SELECT l.tier FROM locked AS l WHERE l.id = accounts.id)
            THEN {_ACCOUNT_SNAPSHOT_SQL} END AS tier_snapshot
    ), posted AS (
        INSERT INTO points_transactions (id, account_id, original_account_id, type, direction,
            amount, points_after, reason, origin_kind, origin_id, reverses_id, reversed_amount,
            metadata, create_time)
        SELECT r.id, r.account_id, NULL, r.type, r.direction, r.amount, moved.balance, r.reason,
            r.origin_kind, r.origin_id, NULL, 0, r.metadata, r.create_time
        FROM moved JOIN request AS r USING (idx)
    ), saved AS (
        INSERT INTO idempotency_keys (key, fingerprint, response, create_time)
        SELECT r.key, r.fingerprint, to_jsonb(r.id), r.create_time
        FROM moved JOIN request AS r USING (idx)
        WHERE r.key IS NOT NULL
        -- In key order: two batches racing on the same keys (from two replicas) then wait
        -- for each other in one order, never in a cycle.
        ORDER BY r.key
        RETURNING key
    ), logs AS (
        -- The events to write, in position order: each posting's points_transaction.created
        -- in idx order, each followed by its tier_changed when it promoted its account.
        SELECT r.idx, 0 AS sub, r.event_id AS id, '{EventType.TRANSACTION_CREATED}' AS type,
            r.create_time, moved.program_id, r.account_id, r.id AS transaction_id,
            CAST(NULL AS jsonb) AS snapshot
        FROM moved JOIN request AS r USING (idx)
        UNION ALL
        SELECT r.idx, 1, {_TIER_EVENT_ID_SQL.format(event_id="r.event_id")},
            '{EventType.ACCOUNT_TIER_CHANGED}', r.create_time, moved.program_id, r.account_id,
            NULL, moved.tier_snapshot
        FROM moved JOIN request AS r USING (idx)
        WHERE moved.tier_snapshot IS NOT NULL
    ), head AS (
        -- The event log's head is the last lock taken (see append_events): after the keys'
        -- inserts, which may wait for a racing retry's. One position per event written.
        UPDATE event_log_head SET position = event_log_head.position + (SELECT count(*) FROM logs)
        WHERE EXISTS (SELECT 1 FROM moved) AND (SELECT count(*) FROM saved) >= 0
        RETURNING position
    ), logged AS (
        INSERT INTO events (position, id, type, create_time, program_id, account_id,
            transaction_id, snapshot)
        SELECT head.position - (SELECT count(*) FROM logs)
                + row_number() OVER (ORDER BY logs.idx, logs.sub),
            logs.id, logs.type, logs.create_time, logs.program_id, logs.account_id,
            logs.transaction_id, logs.snapshot
        FROM head, logs
    )
    SELECT request.idx, moved.balance AS points_after, prior.fingerprint AS prior_fingerprint,
           prior.response AS prior_response
    FROM request LEFT JOIN moved USING (idx) LEFT JOIN prior USING (idx)
    """)
)


async def post_transactions(conn: Conn, postings: list[NewPosting]) -> list[Posted]:
    """Posts, in one statement and one commit, each transaction whose account is ACTIVE, not
    locked by another transaction, and stays within bounds. Accounts and request keys must be
    distinct within the batch.

    Returns what happened to each: points_after when posted, the stored response when its
    request id had one, neither when the batch left it alone (account missing, locked
    elsewhere, not ACTIVE or out of bounds; `account` is never filled in here). Raises
    BatchNotTaken when the database refused the batch for one of its postings (a key a
    concurrent request stored first, data it cannot hold); then nothing of it was written.
    """
    rows = []
    for idx, posting in enumerate(postings):
        row = _posting_values(posting)
        row.update(idx=idx, create_time=posting.ptx.create_time.isoformat())
        rows.append(row)
    try:
        cursor = await conn.execute(_POST_TRANSACTIONS, {"postings": Jsonb(rows)})
    except (pg_errors.IntegrityError, pg_errors.DataError, pg_errors.TransactionRollback) as error:
        # A racing retry stored a key first (across replicas, two batches may even deadlock
        # on two keys), or one posting holds data the database refuses.
        raise BatchNotTaken(repr(error)) from None
    done = [Posted(None)] * len(postings)
    for row in await cursor.fetchall():
        if row.points_after is not None:
            done[row.idx] = Posted(row.points_after)
        elif row.prior_fingerprint is not None:
            done[row.idx] = Posted(
                None, prior=StoredResponse(row.prior_fingerprint, row.prior_response)
            )
    return done


async def insert_transaction(conn: Conn, ptx: PointsTransaction) -> None:
    await conn.execute(_INSERT_TRANSACTION, _transaction_params(ptx))


async def get_transaction(
    conn: Conn, transaction_id: str, *, lock: bool = False
) -> PointsTransaction | None:
    row = await _one(conn, _LOCK_TRANSACTION if lock else _GET_TRANSACTION, {"id": transaction_id})
    return _transaction(row) if row else None


_LOCK_TRANSACTIONS = _sql(
    sa.select(*_TRANSACTION_COLUMNS)
    .where(
        points_transactions.c.id == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Text)))
    )
    .order_by(points_transactions.c.id)
    .with_for_update()
)


async def lock_transactions(conn: Conn, transaction_ids: list[str]) -> list[PointsTransaction]:
    """Locks the transactions' rows in id order (so no two lockers wait in a cycle); returns
    them in the order of `transaction_ids`."""
    cursor = await conn.execute(_LOCK_TRANSACTIONS, {"ids": transaction_ids})
    found = {row.id: _transaction(row) for row in await cursor.fetchall()}
    return [found[i] for i in transaction_ids]


async def add_reversed_amount(conn: Conn, transaction_id: str, amount: int) -> None:
    await conn.execute(_ADD_REVERSED_AMOUNT, {"id": transaction_id, "amount": amount})


@functools.cache
def _list_transactions_sql(account: bool, type_: bool, direction: bool, after: bool) -> str:
    table = points_transactions
    statement = sa.select(*_TRANSACTION_COLUMNS, table.c.seq)
    if account:
        statement = statement.where(table.c.account_id == _bind(table.c.account_id))
    if type_:
        statement = statement.where(table.c.type == _bind(table.c.type))
    if direction:
        statement = statement.where(table.c.direction == _bind(table.c.direction))
    return _sql(_keyset(statement, table.c.seq, after))


async def list_transactions(
    conn: Conn, where: TransactionFilter, after: int | None, limit: int
) -> Page[PointsTransaction]:
    sql = _list_transactions_sql(
        where.account is not None,
        where.type is not None,
        where.direction is not None,
        after is not None,
    )
    params = {
        "account_id": where.account,
        "type": where.type.value if where.type else None,
        "direction": where.direction.value if where.direction else None,
        "after": after,
        "limit": limit + 1,
    }
    cursor = await conn.execute(sql, params)
    return _page(await cursor.fetchall(), limit, _transaction)


# ---------------------------------------------------------------------------------------
# Merges.

_LAST_TRANSACTION_SEQ = _sql(
    sa.select(
        sa.func.coalesce(sa.func.max(points_transactions.c.seq), _const(0)).label("seq")
    ).where(
        points_transactions.c.account_id
        == sa.any_(sa.bindparam("ids", type_=postgresql.ARRAY(sa.Text)))
    )
)
_REPARENT_TRANSACTIONS = _sql(
    sa.update(points_transactions)
    .where(points_transactions.c.account_id == sa.bindparam("source", type_=sa.Text))
    .values(
        account_id=sa.bindparam("target", type_=sa.Text),
        original_account_id=sa.func.coalesce(
            points_transactions.c.original_account_id, sa.bindparam("source", type_=sa.Text)
        ),
    )
)
_RECORD_MERGE = _sql(sa.insert(account_merges).values({c.name: _bind(c) for c in account_merges.c}))


async def last_transaction_seq(conn: Conn, account_ids: Iterable[str]) -> int:
    row = await _one(conn, _LAST_TRANSACTION_SEQ, {"ids": list(account_ids)})
    assert row is not None
    return row.seq


async def reparent_transactions(conn: Conn, source: str, target: str) -> None:
    await conn.execute(_REPARENT_TRANSACTIONS, {"source": source, "target": target})


async def record_merge(
    conn: Conn, source: Account, target: str, after_seq: int, now: datetime
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
        },
    )


# ---------------------------------------------------------------------------------------
# The event log.

_APPEND_EVENTS = _sql(
    sa.text("""
    WITH head AS (
        UPDATE event_log_head SET position = event_log_head.position + :count
        RETURNING position
    )
    INSERT INTO events (position, id, type, create_time, program_id, account_id,
        transaction_id, snapshot)
    SELECT head.position - :count + e.ord, e.id, e.type, e.create_time, e.program_id,
        e.account_id, e.transaction_id, e.snapshot
    FROM head, jsonb_to_recordset(CAST(:events AS jsonb)) AS e(ord int, id text, type text,
        create_time timestamptz, program_id text, account_id text, transaction_id text,
        snapshot jsonb)
    """)
)


async def append_events(conn: Conn, new_events: list[Event]) -> None:
    """Appends events to the log, in its transaction: call it as the transaction's last step.

    Positions are taken from event_log_head, whose row lock the transaction then holds until
    it commits. So positions become visible in order, with no gaps: a reader that has seen
    position N has seen every position before it, and nothing with a lower position can
    commit later. It also serialises the commits of all writers, which is why this is the
    last lock any transaction takes (no deadlock with row locks taken before it) and why it
    comes last (it is held for the shortest time).
    """
    if not new_events:
        return  # nothing changed (a payment that earned nothing): no need to queue for the head
    rows = [
        {
            "ord": ord_,
            "id": event.id,
            "type": event.type.value,
            "create_time": event.create_time.isoformat(),
            "program_id": event.program,
            "account_id": event.account,
            "transaction_id": (
                event.snapshot.id if isinstance(event.snapshot, PointsTransaction) else None
            ),
            "snapshot": to_json(event.snapshot) if isinstance(event.snapshot, Account) else None,
        }
        for ord_, event in enumerate(new_events, start=1)
    ]
    await conn.execute(_APPEND_EVENTS, {"count": len(rows), "events": Jsonb(rows)})


_TRANSACTION_COLUMN_NAMES = ", ".join(f"t.{c.name}" for c in _TRANSACTION_COLUMNS)


@functools.cache
def _events_page_sql(program: bool, account: bool) -> str:
    """Events after a position, oldest first, with the log's head and oldest retained
    position, all read in the statement's one snapshot. It looks at most EVENTS_WINDOW
    positions past `after`, so that a filter matching few events still costs a bounded
    read: the page then ends at the window's end (see EventPage.reached)."""
    conditions = [
        "e.position > :after",
        "e.position <= least(head.position, :window_end)",
        "e.type = ANY(:types)",
    ]
    if program:
        conditions.append("e.program_id = :program_id")
    if account:
        conditions.append("e.account_id = :account_id")
    return _sql(
        sa.text(f"""
        SELECT head.position AS head,
            coalesce((SELECT min(position) FROM events), head.position + 1) AS oldest,
            page.*
        FROM event_log_head AS head LEFT JOIN LATERAL (
            SELECT e.position, e.id AS event_id, e.type AS event_type,
                e.create_time AS event_time, e.program_id AS event_program,
                e.account_id AS event_account, e.snapshot, {_TRANSACTION_COLUMN_NAMES}
            FROM events AS e LEFT JOIN points_transactions AS t ON t.id = e.transaction_id
            WHERE {" AND ".join(conditions)}
            ORDER BY e.position
            LIMIT :limit
        ) AS page ON true
        """)
    )


# Positions one read of the event log looks at, at most.
EVENTS_WINDOW = 50_000
MAX_POSITION = 2**63 - 1  # bigint


@dataclass(frozen=True)
class EventPage:
    events: list[Event]
    head: int  # the newest committed position when the page was read
    oldest: int  # the oldest retained position then (head + 1 when none is)
    # Every matching event up to this position is in this page or was before `after`; the
    # page reached the head when this equals it.
    reached: int


async def events_page(
    conn: Conn, where: EventFilter, after: int, limit: int, window: int = EVENTS_WINDOW
) -> EventPage:
    sql = _events_page_sql(where.program is not None, where.account is not None)
    params = {
        "after": after,
        "types": [t.value for t in where.types],
        "program_id": where.program,
        "account_id": where.account,
        "limit": limit,
        # Worked out here: `after + window` in SQL would overflow bigint for an `after` near
        # 2^63 (which then finds itself past the head: OUT_OF_RANGE).
        "window_end": min(after + window, MAX_POSITION),
    }
    cursor = await conn.execute(sql, params)
    rows = await cursor.fetchall()
    found = [_event(row) for row in rows if row.position is not None]
    head = rows[0].head
    if found and len(found) == limit:
        reached = found[-1].position
    else:
        reached = max(after, min(head, after + window))
    return EventPage(found, head, rows[0].oldest, reached)


def _event(row: Row) -> Event:
    snapshot: Account | PointsTransaction
    if row.snapshot is None:
        snapshot = as_posted(_transaction(row))
    else:
        snapshot = from_json(Account, row.snapshot)
    return Event(
        id=row.event_id,
        type=EventType(row.event_type),
        create_time=row.event_time,
        program=row.event_program,
        account=row.event_account,
        snapshot=snapshot,
        position=row.position,
    )


# The channel migration 0002's trigger notifies when the event log's head moves.
EVENTS_CHANNEL = "loyalty_events"


async def listen_for_events(conn: Conn) -> None:
    await conn.execute(f"LISTEN {EVENTS_CHANNEL}")


_OLDEST_AND_HEAD = _sql(
    sa.select(
        sa.select(sa.func.min(events.c.position)).scalar_subquery().label("oldest"),
        event_log_head.c.position.label("head"),
    )
)
_EVENT_TIME = _sql(
    sa.select(events.c.create_time).where(events.c.position == sa.bindparam("position"))
)
_PRUNE_EVENTS = _sql(
    sa.delete(events).where(
        events.c.position < sa.bindparam("before", type_=sa.BigInteger),
    )
)
_PRUNE_CHUNK = 10_000


async def prune_events(conn: Conn, before: datetime) -> int:
    """Deletes the events written before `before`, oldest first, so that what is retained is
    always one run of positions (a resume finds all of its events, or none: no holes).

    The cut is found by binary search over the positions (event times rise with them, to
    within the replicas' clock skew) rather than by an index on time, which every write
    would pay for.
    """
    row = await _one(conn, _OLDEST_AND_HEAD, {})
    assert row is not None
    if row.oldest is None:
        return 0
    low, high = row.oldest, row.head + 1  # the first position to keep is in [low, high]
    while low < high:
        middle = (low + high) // 2
        time_row = await _one(conn, _EVENT_TIME, {"position": middle})
        if time_row is not None and time_row.create_time >= before:
            high = middle
        else:  # older, or just pruned by another replica
            low = middle + 1
    pruned = 0
    for cut in range(row.oldest + _PRUNE_CHUNK, low + _PRUNE_CHUNK, _PRUNE_CHUNK):
        cursor = await conn.execute(_PRUNE_EVENTS, {"before": min(cut, low)})
        pruned += cursor.rowcount
    return pruned


# ---------------------------------------------------------------------------------------
# Payments and refunds. Their ids are exactly-once keys, claimed by inserting the row first,
# as claim_request does for request ids; unlike request ids they are kept for good.

_CLAIMED_PAYMENT_COLUMNS = (
    "id", "program_id", "customer", "amount", "currency", "occurred_at", "metadata",
    "fingerprint", "create_time",
)  # fmt: skip
_CLAIM_PAYMENT = _sql(
    pg_insert(payments)
    .values({name: _bind(payments.c[name]) for name in _CLAIMED_PAYMENT_COLUMNS})
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(payments.c.id)
)
_STORED_PAYMENT = _sql(
    sa.select(payments.c.fingerprint, payments.c.response).where(
        payments.c.id == _bind(payments.c.id)
    )
)
_SAVE_PAYMENT = _sql(
    sa.update(payments)
    .where(payments.c.id == _bind(payments.c.id))
    .values(
        {
            c.name: _bind(c)
            for c in payments.c
            if c.name in ("outcome", "account_id", "earn_ids", "response")
        }
    )
)
_LOCK_PAYMENT = _sql(
    sa.select(payments.c.id, payments.c.amount, payments.c.earn_ids, payments.c.refunded_amount)
    .where(payments.c.id == _bind(payments.c.id))
    .with_for_update()
)
_SAVE_REFUNDED = _sql(
    sa.update(payments)
    .where(payments.c.id == _bind(payments.c.id))
    .values(refunded_amount=_bind(payments.c.refunded_amount))
)
_CLAIM_REFUND = _sql(
    pg_insert(refunds)
    .values(
        {
            c.name: _bind(c)
            for c in refunds.c
            if c.name in ("id", "payment_id", "amount", "fingerprint", "create_time")
        }
    )
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(refunds.c.id)
)
_STORED_REFUND = _sql(
    sa.select(refunds.c.fingerprint, refunds.c.response).where(refunds.c.id == _bind(refunds.c.id))
)
_SAVE_REFUND = _sql(
    sa.update(refunds)
    .where(refunds.c.id == _bind(refunds.c.id))
    .values(response=_bind(refunds.c.response))
)


@dataclass(frozen=True)
class PaidPayment:
    """What a refund needs of a payment (locked)."""

    id: str
    amount: int
    earn_ids: list[str]
    refunded_amount: int


async def _claim(
    conn: Conn, claim_sql: str, stored_sql: str, params: dict[str, object]
) -> StoredResponse | None:
    """Inserts the row that claims an id (`params["id"]`), or returns what is stored for it."""
    if await _one(conn, claim_sql, params) is not None:
        return None
    stored = await _stored(conn, stored_sql, params["id"])
    assert stored is not None, "a conflicting claim is committed before the conflict shows"
    return stored


async def _stored(conn: Conn, stored_sql: str, claimed_id: object) -> StoredResponse | None:
    row = await _one(conn, stored_sql, {"id": claimed_id})
    return StoredResponse(row.fingerprint, row.response) if row else None


async def claim_payment(
    conn: Conn, payment: NewPayment, fingerprint: str, now: datetime
) -> StoredResponse | None:
    """Claims the payment id for this transaction, or returns what is stored for it; a
    concurrent claim waits for the first to end (see claim_request)."""
    params = {
        "id": payment.id,
        "program_id": payment.program,
        "customer": payment.customer,
        "amount": payment.amount,
        "currency": payment.currency,
        "occurred_at": payment.occurred_at,
        "metadata": Jsonb(payment.metadata),
        "fingerprint": fingerprint,
        "create_time": now,
    }
    return await _claim(conn, _CLAIM_PAYMENT, _STORED_PAYMENT, params)


async def stored_payment(conn: Conn, payment_id: str) -> StoredResponse | None:
    return await _stored(conn, _STORED_PAYMENT, payment_id)


async def stored_refund(conn: Conn, refund_id: str) -> StoredResponse | None:
    return await _stored(conn, _STORED_REFUND, refund_id)


async def save_payment(
    conn: Conn, payment_id: str, outcome: str, account_id: str | None, earn_ids: list[str],
    response: object,
) -> None:  # fmt: skip
    params = {
        "id": payment_id,
        "outcome": outcome,
        "account_id": account_id,
        "earn_ids": earn_ids,
        "response": Jsonb(response),
    }
    await conn.execute(_SAVE_PAYMENT, params)


async def lock_payment(conn: Conn, payment_id: str) -> PaidPayment | None:
    row = await _one(conn, _LOCK_PAYMENT, {"id": payment_id})
    return PaidPayment(row.id, row.amount, row.earn_ids, row.refunded_amount) if row else None


async def save_refunded(conn: Conn, payment_id: str, refunded_amount: int) -> None:
    await conn.execute(_SAVE_REFUNDED, {"id": payment_id, "refunded_amount": refunded_amount})


async def claim_refund(
    conn: Conn, refund: NewRefund, fingerprint: str, now: datetime
) -> StoredResponse | None:
    """As claim_payment, for a refund id."""
    params = {
        "id": refund.id,
        "payment_id": refund.payment_id,
        "amount": refund.amount,
        "fingerprint": fingerprint,
        "create_time": now,
    }
    return await _claim(conn, _CLAIM_REFUND, _STORED_REFUND, params)


async def save_refund(conn: Conn, refund_id: str, response: object) -> None:
    await conn.execute(_SAVE_REFUND, {"id": refund_id, "response": Jsonb(response)})


# ---------------------------------------------------------------------------------------
# Keyset pages.


def _keyset(statement: sa.Select, seq: sa.Column, after: bool) -> sa.Select:
    # Newest first. One extra row (limit is page size + 1) tells whether a page follows.
    if after:
        statement = statement.where(seq < sa.bindparam("after", type_=sa.BigInteger))
    return statement.order_by(seq.desc()).limit(sa.bindparam("limit", type_=sa.Integer))


def _page(rows: list[Row], limit: int, convert: typing.Callable[[Row], T]) -> Page[T]:
    items = rows[:limit]
    next_after = items[-1].seq if len(rows) > limit else None
    return Page([convert(row) for row in items], next_after, [row.seq for row in items])


# ---------------------------------------------------------------------------------------
# Idempotency keys.

_CLAIM_REQUEST = _sql(
    pg_insert(idempotency_keys)
    .values(
        key=_bind(idempotency_keys.c.key),
        fingerprint=_bind(idempotency_keys.c.fingerprint),
        create_time=_bind(idempotency_keys.c.create_time),
    )
    .on_conflict_do_nothing(index_elements=["key"])
    .returning(idempotency_keys.c.key)
)
_STORED_RESPONSE = _sql(
    sa.select(idempotency_keys.c.fingerprint, idempotency_keys.c.response).where(
        idempotency_keys.c.key == _bind(idempotency_keys.c.key)
    )
)
_SAVE_RESPONSE = _sql(
    sa.update(idempotency_keys)
    .where(idempotency_keys.c.key == _bind(idempotency_keys.c.key))
    .values(response=_bind(idempotency_keys.c.response))
)
_PRUNE_REQUESTS = _sql(
    sa.delete(idempotency_keys).where(
        idempotency_keys.c.create_time < sa.bindparam("before", type_=sa.DateTime(timezone=True))
    )
)


@dataclass(frozen=True)
class StoredResponse:
    fingerprint: str
    response: typing.Any  # JSON: the response, or what rebuilds it


async def claim_request(
    conn: Conn, key: str, fingerprint: str, now: datetime
) -> StoredResponse | None:
    """Claims a request key for this transaction, or returns the response stored for it.

    A concurrent claim of the same key waits on the primary key until the first transaction
    ends: if that one commits, this returns its response; if it rolls back, this one claims.
    """
    params = {"key": key, "fingerprint": fingerprint, "create_time": now}
    if await _one(conn, _CLAIM_REQUEST, params) is not None:
        return None
    stored = await stored_response(conn, key)
    assert stored is not None, "a conflicting key is committed before the conflict shows"
    return stored


async def stored_response(conn: Conn, key: str) -> StoredResponse | None:
    row = await _one(conn, _STORED_RESPONSE, {"key": key})
    return StoredResponse(row.fingerprint, row.response) if row else None


async def save_response(conn: Conn, key: str, response: object) -> None:
    await conn.execute(_SAVE_RESPONSE, {"key": key, "response": Jsonb(response)})


async def prune_request_keys(conn: Conn, before: datetime) -> int:
    cursor = await conn.execute(_PRUNE_REQUESTS, {"before": before})
    return cursor.rowcount


def to_json(value: object) -> object:
    """A domain object as JSON-ready data, for stored responses."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    return value


@functools.cache
def _type_hints(kind: type) -> dict[str, typing.Any]:
    # Resolving the annotations is most of from_json's cost, and every program read (each
    # payment's) rebuilds its earning rules with it.
    return typing.get_type_hints(kind)


def from_json(kind: type[T], data: object) -> T:
    """The inverse of to_json for the domain's dataclasses."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None  # type: ignore[return-value]
        (inner,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return from_json(inner, data)
    if origin is list:
        (item,) = typing.get_args(kind)
        return [from_json(item, value) for value in data]  # type: ignore[return-value,union-attr]
    if is_dataclass(kind):
        hints = _type_hints(kind)
        return kind(**{name: from_json(hints[name], value) for name, value in data.items()})  # type: ignore[union-attr]
    if kind is datetime:
        return datetime.fromisoformat(data)  # type: ignore[return-value,arg-type]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(data)
    return data  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# Invariant checks; each query returns the rows that break one.

_ptx = points_transactions
_signed = sa.case((_ptx.c.direction == _const("CREDIT"), _ptx.c.amount), else_=-_ptx.c.amount)
_lifetime = sa.case(
    (
        sa.and_(
            _ptx.c.direction == _const("CREDIT"),
            _ptx.c.type.in_([_const("EARN"), _const("ADJUST")]),
        ),
        _ptx.c.amount,
    ),
    else_=_const(0),
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
_ledger_balance = sa.func.coalesce(_ledger_sums.c.balance, _const(0))
_ledger_lifetime = sa.func.coalesce(_ledger_sums.c.lifetime, _const(0))
_BALANCE_VIOLATIONS = _sql(
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
_REVERSAL_VIOLATIONS = _sql(
    sa.select(_ptx.c.id, _ptx.c.reversed_amount, _reversal_sums.c.reversed)
    .select_from(_ptx.outerjoin(_reversal_sums, _reversal_sums.c.reverses_id == _ptx.c.id))
    .where(_ptx.c.reversed_amount != sa.func.coalesce(_reversal_sums.c.reversed, _const(0)))
)
_DUPLICATE_ACTIVE_CUSTOMERS = _sql(
    sa.select(accounts.c.program_id, accounts.c.customer, sa.func.count().label("n"))
    .where(accounts.c.status == _const("ACTIVE"), accounts.c.customer.is_not(None))
    .group_by(accounts.c.program_id, accounts.c.customer)
    .having(sa.func.count() > _const(1))
)
_MERGED_ACCOUNT_VIOLATIONS = _sql(
    sa.select(accounts.c.id, accounts.c.balance, accounts.c.lifetime_points).where(
        accounts.c.status == _const("MERGED"),
        sa.or_(accounts.c.balance != _const(0), accounts.c.lifetime_points != _const(0)),
    )
)
# Every transaction under the account it was posted to, and every merge under its target,
# in posting order; a merge comes right after the transaction whose seq it records.
_chain_entries = sa.union_all(
    sa.select(
        sa.func.coalesce(_ptx.c.original_account_id, _ptx.c.account_id).label("account_id"),
        _ptx.c.seq.label("seq"),
        _const(1).label("kind_order"),
        _ptx.c.id.label("id"),
        _signed.label("signed_amount"),
        _ptx.c.points_after.label("points_after"),
    ),
    sa.select(
        account_merges.c.target_id,
        account_merges.c.after_seq,
        _const(2),
        account_merges.c.source_id,
        account_merges.c.balance_moved,
        sa.null(),
    ),
).subquery()
_CHAIN_ENTRIES = _sql(
    sa.select(_chain_entries).order_by(
        _chain_entries.c.account_id, _chain_entries.c.seq, _chain_entries.c.kind_order
    )
)
_refund_sums = (
    sa.select(refunds.c.payment_id, sa.func.sum(refunds.c.amount).label("refunded"))
    .group_by(refunds.c.payment_id)
    .subquery()
)
_REFUND_VIOLATIONS = _sql(
    sa.select(payments.c.id, payments.c.refunded_amount, _refund_sums.c.refunded)
    .select_from(payments.outerjoin(_refund_sums, _refund_sums.c.payment_id == payments.c.id))
    .where(payments.c.refunded_amount != sa.func.coalesce(_refund_sums.c.refunded, _const(0)))
)
_ACCOUNT_BALANCES = _sql(sa.select(accounts.c.id, accounts.c.status, accounts.c.balance))


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
