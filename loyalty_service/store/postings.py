"""The posting kernel (post: every change of points) and the ledger's rows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sqlalchemy as sa
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb
from sqlalchemy.dialects import postgresql

from ..db import points_transactions
from ..domain.accounts import Account
from ..domain.codec import from_json
from ..domain.events import Event
from ..domain.ids import Page, new_id
from ..domain.points import (
    Change,
    PointsTransaction,
    TransactionFilter,
)
from .events import EVENT_KEYS, event_rows
from .requests import StoredResponse
from .rows import TRANSACTION_COLUMNS, transaction_of
from .sql import Conn, compiled, filtered_page, jsonb_object, one

_TRANSACTION_ID = sa.bindparam("id", type_=sa.Text)


_GET_TRANSACTION = compiled(
    sa.select(*TRANSACTION_COLUMNS).where(points_transactions.c.id == _TRANSACTION_ID)
)


_LOCK_TRANSACTION = compiled(
    sa.select(*TRANSACTION_COLUMNS)
    .where(points_transactions.c.id == _TRANSACTION_ID)
    .with_for_update()
)


# The keys of one posting in post_points' JSON argument.
POSTING_KEYS = (
    "idx", "id", "account_id", "type", "direction", "amount", "delta", "lifetime_delta",
    "min_balance", "max_balance", "closed_ok", "reason", "origin_kind", "origin_id",
    "reverses_id", "rule_id", "rule_version", "metadata", "create_time", "key", "fingerprint",
    "event_id", "actor",
)  # fmt: skip


# `log` left to its default, true: the kernel queues the events itself.
_POST_POINTS = (
    "SELECT posting, result, points_after, replay_fingerprint, replay_response, account"
    " FROM post_points(%(postings)s, %(wait)s, %(snapshots)s, %(events)s)"
)


POSTED, REPLAYED, SKIPPED = "POSTED", "REPLAYED", "SKIPPED"


@dataclass(frozen=True)
class NewPosting:
    """A transaction to post (its points_after is filled in by the kernel), the change it
    makes to its account's totals and, for an idempotent request, its (key, fingerprint)."""

    ptx: PointsTransaction
    change: Change
    request: tuple[str, str] | None = None
    # The id of its points_transaction.created event.
    event_id: str = dataclasses.field(default_factory=lambda: new_id("evt_"))


@dataclass(frozen=True)
class Posted:
    """What the kernel did with one posting: `result` is POSTED, REPLAYED (`prior` is the
    response stored for its request id), SKIPPED (without `wait`: its account was locked
    elsewhere, or does not exist), or the
    reason it was refused (ACCOUNT_NOT_FOUND, ACCOUNT_NOT_ACTIVE, INSUFFICIENT_POINTS,
    BALANCE_LIMIT_EXCEEDED), when `account` is the account as it is."""

    result: str
    points_after: int | None = None
    # Refused: the account as it is. The last posting, posted, with snapshots: as after it.
    account: Account | None = None
    prior: StoredResponse | None = None


class NotTaken(Exception):
    """The database refused a call of the kernel because of one of its postings (a request
    key that a concurrent request stored first, a deadlock between two such, data it cannot
    hold); nothing of the call was written. `key_taken` says it was a request key."""

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error
        self.key_taken = (
            isinstance(error, pg_errors.UniqueViolation)
            and error.diag.constraint_name == "pk_idempotency_keys"
        )


def posting_row(idx: int, posting: NewPosting) -> dict[str, object]:
    ptx, change = posting.ptx, posting.change
    key, fingerprint = posting.request or (None, None)
    return {
        "idx": idx,
        "id": ptx.id,
        "account_id": ptx.account,
        "type": ptx.type.value,
        "direction": ptx.direction.value,
        "amount": ptx.amount,
        "delta": change.delta,
        "lifetime_delta": change.lifetime_delta,
        "min_balance": change.min_balance,
        "max_balance": change.max_balance,
        "closed_ok": change.closed_ok,
        "reason": ptx.reason,
        "origin_kind": ptx.origin_kind.value,
        "origin_id": ptx.origin_id,
        "reverses_id": ptx.reverses,
        "rule_id": ptx.rule,
        "rule_version": ptx.rule_version,
        "metadata": ptx.metadata,
        "create_time": ptx.create_time.isoformat(),
        "key": key,
        "fingerprint": fingerprint,
        "event_id": posting.event_id,
        "actor": ptx.actor,
    }


async def post(
    conn: Conn,
    postings: list[NewPosting],
    *,
    wait: bool = True,
    snapshots: bool = False,
    events_before: list[Event] | None = None,
) -> list[Posted]:
    """Posts each posting in order, each if its account is ACTIVE (or CLOSED, where its
    change allows that) and its balance stays within the change's bounds; queues their
    events after `events_before` (log_events), as its last step. One statement, one round
    trip.

    `wait`: wait for each account's row lock; without it, a posting whose account another
    transaction holds is SKIPPED, so the call never waits on a row lock (group commit).
    `snapshots`: fill in `account` of the last posting, if posted, as after it.
    Raises NotTaken.
    """
    params = {
        "postings": Jsonb([posting_row(idx, p) for idx, p in enumerate(postings)]),
        "wait": wait,
        "snapshots": snapshots,
        "events": Jsonb(event_rows(events_before or [])),
    }
    try:
        # In pipeline mode the error may come with the rows: both are inside.
        rows = await (await conn.execute(_POST_POINTS, params)).fetchall()
    except (pg_errors.IntegrityError, pg_errors.DataError, pg_errors.TransactionRollback) as error:
        raise NotTaken(error) from None
    done = []
    for row in rows:
        prior = None
        if row.replay_fingerprint is not None:
            prior = StoredResponse(row.replay_fingerprint, row.replay_response)
        account = from_json(Account, row.account) if row.account is not None else None
        done.append(Posted(row.result, row.points_after, account, prior))
    return done


def post_points_call(
    postings: list[dict[str, str]],
    events_before: list[dict[str, str]] | None = None,
    *,
    wait: bool = True,
    snapshots: bool = False,
    log: bool = True,
) -> str:
    """The kernel's call as store.post makes it, with each posting's POSTING_KEYS and each
    event's EVENT_KEYS given as SQL expressions: for a benchmark's pgbench baseline. With
    `log` false, the same call with its event-log writes removed (the kernel returns the
    events, as a last row UNLOGGED, and writes none): make bench's event_log baseline."""

    def array(items: list[dict[str, str]], keys: tuple[str, ...]) -> str:
        objects = [jsonb_object(item, keys) for item in items]
        return f"jsonb_build_array({', '.join(objects)})"

    return (
        f"SELECT * FROM post_points({array(postings, POSTING_KEYS)}, {str(wait).lower()},"
        f" {str(snapshots).lower()}, {array(events_before or [], EVENT_KEYS)},"
        f" {str(log).lower()})"
    )


async def get_transaction(
    conn: Conn, transaction_id: str, *, lock: bool = False
) -> PointsTransaction | None:
    row = await one(conn, _LOCK_TRANSACTION if lock else _GET_TRANSACTION, {"id": transaction_id})
    return transaction_of(row) if row else None


_LOCK_TRANSACTIONS = compiled(
    sa.select(*TRANSACTION_COLUMNS)
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
    found = {row.id: transaction_of(row) for row in await cursor.fetchall()}
    return [found[i] for i in transaction_ids]


async def list_transactions(
    conn: Conn, where: TransactionFilter, after: int | None, limit: int
) -> Page[PointsTransaction]:
    filters = {
        "account_id": where.account,
        "type": where.type.value if where.type else None,
        "direction": where.direction.value if where.direction else None,
    }
    table, columns = points_transactions, TRANSACTION_COLUMNS
    return await filtered_page(conn, table, columns, filters, after, limit, transaction_of)
