"""Holds: their writes, each one statement of a function of migration 0011, and reads."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb

from ..db import points_holds
from ..domain.accounts import Account
from ..domain.codec import from_json
from ..domain.holds import Hold, HoldFilter, HoldStatus, NewHold
from ..domain.ids import Page
from .postings import NewPosting, posting_row
from .sql import Conn, Row, filtered_page, jsonb_object, one

CREATED, EXISTING, CAPTURED, RELEASED, REPLAYED, MOVED = (
    "CREATED", "EXISTING", "CAPTURED", "RELEASED", "REPLAYED", "MOVED",
)  # fmt: skip

_REFERENCE_CONSTRAINT = "uq_points_holds_program_id_reference"


class ReferenceTaken(Exception):
    """A concurrent request with the same reference, on another account, created its hold
    first; nothing of this one was written. Asked again, it finds that hold."""


@dataclass(frozen=True)
class HoldWritten:
    """What a hold function did: `result` (CREATED, EXISTING, CAPTURED, RELEASED, REPLAYED,
    MOVED, or the reason it refused), the hold and the account as it then was (what the
    function knows of them), what the first request asked for (EXISTING: its fingerprint;
    REPLAYED: the request id's), and for a refused TTL the program's maximum."""

    result: str
    hold: Hold | None
    account: Account | None
    fingerprint: str | None = None
    max_ttl_seconds: int | None = None


# What the hold functions answer when they did what was asked (or found it done): the
# account they return then is not needed.
_DONE = frozenset({CREATED, EXISTING, CAPTURED, RELEASED, REPLAYED})


def _written(row: Row, fingerprint: str | None, max_ttl_seconds: int | None = None) -> HoldWritten:
    account = None
    if row.account is not None and row.result not in _DONE:
        account = from_json(Account, row.account)
    hold = hold_of(row.hold) if row.hold is not None else None
    return HoldWritten(row.result, hold, account, fingerprint, max_ttl_seconds)


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def hold_of(data: dict[str, typing.Any]) -> Hold:
    """A hold as SQL hold_json writes it (a read of every hold and every hold function's
    answer: explicit, as rows.account_of, rather than the codec's reflection)."""
    return Hold(
        id=data["id"],
        account=data["account"],
        original_account=data["original_account"],
        program=data["program"],
        reference=data["reference"],
        amount=data["amount"],
        captured_amount=data["captured_amount"],
        status=HoldStatus(data["status"]),
        reason=data["reason"],
        metadata=data["metadata"],
        create_time=datetime.fromisoformat(data["create_time"]),
        expire_time=datetime.fromisoformat(data["expire_time"]),
        capture_time=_time(data["capture_time"]),
        release_time=_time(data["release_time"]),
        capture_transaction=data["capture_transaction"],
        account_version=data["account_version"],
        actor=data["actor"],
        captured_by=data["captured_by"],
        released_by=data["released_by"],
    )


# The keys of create_hold's and finish_hold's requests (migration 0011).
CREATE_HOLD_KEYS = (
    "id", "account_id", "program_ids", "reference", "amount", "reason", "metadata",
    "create_time", "ttl_seconds", "fingerprint", "actor", "event_id",
)  # fmt: skip
FINISH_HOLD_KEYS = (
    "action", "hold_id", "amount", "at", "actor", "program_ids", "key", "fingerprint",
    "event_id", "posting",
)  # fmt: skip


def hold_call(function: str, request: dict[str, str]) -> str:
    """create_hold's or finish_hold's call as the store makes it, with each key of its
    request given as an SQL expression (a capture's `posting` with POSTING_KEYS): for make
    bench's pgbench baseline."""
    keys = {"create_hold": CREATE_HOLD_KEYS, "finish_hold": FINISH_HOLD_KEYS}[function]
    return f"SELECT * FROM {function}({jsonb_object(request, keys)})"


_CREATE_HOLD = "SELECT * FROM create_hold(%(request)s)"


async def create_hold(
    conn: Conn,
    hold_id: str,
    new: NewHold,
    programs: frozenset[str] | None,
    now: datetime,
    actor: str,
    fingerprint: str,
    event_id: str,
) -> HoldWritten:
    """Creates the hold, if its account (of one of `programs`, None: any) is ACTIVE and has
    its amount available; or finds the hold its reference already names (EXISTING). Raises
    ReferenceTaken."""
    request = {
        "id": hold_id,
        "account_id": new.account,
        "program_ids": sorted(programs) if programs is not None else None,
        "reference": new.reference,
        "amount": new.amount,
        "reason": new.reason,
        "metadata": new.metadata,
        "create_time": now.isoformat(),
        "ttl_seconds": new.ttl_seconds,
        "fingerprint": fingerprint,
        "actor": actor,
        "event_id": event_id,
    }
    assert tuple(request) == CREATE_HOLD_KEYS
    try:
        row = await one(conn, _CREATE_HOLD, {"request": Jsonb(request)})
    except pg_errors.UniqueViolation as error:
        if error.diag.constraint_name == _REFERENCE_CONSTRAINT:
            raise ReferenceTaken from None
        raise
    assert row is not None
    return _written(row, row.fingerprint, row.max_ttl_seconds)


_FINISH_HOLD = "SELECT * FROM finish_hold(%(request)s)"


async def finish_hold(
    conn: Conn,
    hold_id: str,
    *,
    capture: NewPosting | None,
    amount: int | None,
    programs: frozenset[str] | None,
    now: datetime,
    actor: str,
    request: tuple[str, str] | None,
    event_id: str,
) -> HoldWritten:
    """Captures the hold (`capture`: its REDEEM, for `amount`, None: all) or releases it,
    once per request (key, fingerprint), if it is HELD and its time is not up."""
    key, fingerprint = request or (None, None)
    params = {
        "action": "CAPTURE" if capture is not None else "RELEASE",
        "hold_id": hold_id,
        "amount": amount,
        "at": now.isoformat(),
        "actor": actor,
        "program_ids": sorted(programs) if programs is not None else None,
        "key": key,
        "fingerprint": fingerprint,
        "event_id": event_id,
        "posting": posting_row(0, capture) if capture is not None else None,
    }
    assert tuple(params) == FINISH_HOLD_KEYS
    row = await one(conn, _FINISH_HOLD, {"request": Jsonb(params)})
    assert row is not None
    return _written(row, row.prior_fingerprint)


_SETTLE_EXPIRED_HOLDS = "SELECT settle_expired_holds(%(account_id)s, %(now)s, %(actor)s) AS expired"


async def settle_expired_holds(conn: Conn, account_id: str, now: datetime, actor: str) -> int:
    """Records the expiry of the account's HELD holds whose time is up at `now` (locking
    the account, if the transaction does not hold it yet): how many."""
    params = {"account_id": account_id, "now": now, "actor": actor}
    row = await one(conn, _SETTLE_EXPIRED_HOLDS, params)
    assert row is not None
    return row.expired


_EXPIRED_ACCOUNTS = """
SELECT DISTINCT account_id FROM (
    SELECT account_id FROM points_holds
    WHERE status = 'HELD' AND expire_time <= %(now)s
    ORDER BY expire_time
    LIMIT %(limit)s) AS due
"""


async def accounts_with_expired_holds(conn: Conn, now: datetime, limit: int) -> list[str]:
    """Accounts with HELD holds whose time is up at `now`, those of the oldest first."""
    cursor = await conn.execute(_EXPIRED_ACCOUNTS, {"now": now, "limit": limit})
    return [row.account_id for row in await cursor.fetchall()]


_OLDEST_UNSETTLED = (
    "SELECT min(expire_time) AS oldest FROM points_holds"
    " WHERE status = 'HELD' AND expire_time <= %(now)s"
)


async def oldest_unsettled_expiry(conn: Conn, now: datetime) -> datetime | None:
    """When the longest-expired hold not yet recorded as EXPIRED ran out (the job's lag)."""
    row = await one(conn, _OLDEST_UNSETTLED, {"now": now})
    assert row is not None
    return row.oldest


# The source's HELD holds go to the target, with their points; original_account keeps
# where each was made. Both accounts are locked by the merge.
_MOVE_HOLDS = """
WITH moved AS (
    UPDATE points_holds
    SET account_id = %(target)s, original_account_id = coalesce(original_account_id, %(source)s)
    WHERE account_id = %(source)s AND status = 'HELD'
    RETURNING amount
), total AS (
    SELECT coalesce(sum(amount), 0) AS points FROM moved
)
UPDATE accounts SET held_points = accounts.held_points
    + CASE WHEN accounts.id = %(target)s THEN total.points ELSE -total.points END
FROM total
WHERE accounts.id IN (%(source)s, %(target)s)
"""


async def move_holds(conn: Conn, source: str, target: str) -> None:
    """Moves the source's HELD holds, and the points they hold, to the target."""
    await conn.execute(_MOVE_HOLDS, {"source": source, "target": target})


_HELD_HOLDS = (
    "SELECT count(*) AS n FROM points_holds"
    " WHERE account_id = %(account_id)s AND status = 'HELD' AND expire_time > %(now)s"
)


async def count_held(conn: Conn, account_id: str, now: datetime) -> int:
    """The account's HELD holds whose time is not up at `now`."""
    row = await one(conn, _HELD_HOLDS, {"account_id": account_id, "now": now})
    assert row is not None
    return row.n


_HOLD_AT = sa.func.hold_json(
    sa.literal_column("points_holds"), sa.bindparam("now", type_=sa.DateTime(True))
).label("hold")

_GET_HOLD = "SELECT hold_json(points_holds, %(now)s) AS hold FROM points_holds WHERE id = %(id)s"


async def get_hold(conn: Conn, hold_id: str, now: datetime) -> Hold | None:
    """The hold as of `now` (EXPIRED once its time is up)."""
    row = await one(conn, _GET_HOLD, {"id": hold_id, "now": now})
    return hold_of(row.hold) if row else None


async def list_holds(
    conn: Conn, where: HoldFilter, after: int | None, limit: int, now: datetime
) -> Page[Hold]:
    """Holds newest first, as of `now`."""
    filters = {"account_id": where.account}
    return await filtered_page(
        conn,
        points_holds,
        [_HOLD_AT],
        filters,
        after,
        limit,
        lambda row: hold_of(row.hold),
        {"now": now},
    )
