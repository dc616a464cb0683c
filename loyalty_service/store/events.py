"""The event log: appending, pages of events, notifications, pruning."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from psycopg.types.json import Jsonb

from ..db import event_log_head, events
from ..domain.accounts import Account
from ..domain.codec import from_json, to_json
from ..domain.events import HOLD_EVENT_TYPES, Event, EventFilter, EventType
from ..domain.holds import Hold
from ..domain.points import PointsTransaction, as_posted
from .rows import TRANSACTION_COLUMNS, transaction_of
from .sql import Conn, Row, compiled, one

LOG_EVENTS = "SELECT log_events(%(events)s)"


async def log_events(conn: Conn, new_events: list[Event]) -> None:
    """Appends events to the event queue (SQL log_events, migration 0009), in the caller's
    transaction, which has taken all its row locks (their order in the log follows from
    that); the sequencer gives them their positions once it has committed
    (sequence_events)."""
    if new_events:
        await conn.execute(LOG_EVENTS, {"events": Jsonb(event_rows(new_events))})


_SEQUENCE_EVENTS = "SELECT sequence_events(%(max_events)s) AS moved"


async def sequence_events(conn: Conn, max_events: int) -> int:
    """One pass of the sequencer (migration 0009), on an autocommit connection: one
    statement, so one transaction of its own. Moves up to `max_events` committed queued
    events into the log, at the next positions, in the order they were queued. How many it
    moved."""
    row = await one(conn, _SEQUENCE_EVENTS, {"max_events": max_events})
    assert row is not None
    return row.moved


_OLDEST_QUEUED = "SELECT create_time FROM event_queue ORDER BY seq, ord LIMIT 1"


async def oldest_queued(conn: Conn) -> datetime | None:
    """When the oldest event still waiting for a position was written (None: none waits).
    One probe of the queue's key."""
    row = await one(conn, _OLDEST_QUEUED, {})
    return row.create_time if row else None


_LAST_QUEUED = "SELECT max(seq) AS seq FROM event_queue"


async def last_queued(conn: Conn) -> int | None:
    """The seq of the newest committed event still waiting for a position, if any."""
    row = await one(conn, _LAST_QUEUED, {})
    return row.seq if row else None


_STILL_QUEUED = "SELECT EXISTS (SELECT FROM event_queue WHERE seq <= %(seq)s) AS waiting"


async def still_queued(conn: Conn, seq: int) -> bool:
    """Whether an event queued at `seq` or before still waits for its position."""
    row = await one(conn, _STILL_QUEUED, {"seq": seq})
    assert row is not None
    return row.waiting


@dataclass(frozen=True)
class Queued:
    events: int
    oldest: datetime | None


_QUEUED = "SELECT count(*) AS n, min(create_time) AS oldest FROM event_queue"


async def queued(conn: Conn) -> Queued:
    """The events waiting for a position: how many (a count of the queue), the oldest's time."""
    row = await one(conn, _QUEUED, {})
    assert row is not None
    return Queued(row.n, row.oldest)


# The keys of one event in log_events' (and post_points') JSON argument.
EVENT_KEYS = ("id", "type", "create_time", "program_id", "account_id", "transaction_id", "snapshot")


def event_rows(new_events: list[Event]) -> list[dict[str, object]]:
    return [
        {
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
        for event in new_events
    ]


_TRANSACTION_COLUMN_NAMES = ", ".join(f"t.{c.name}" for c in TRANSACTION_COLUMNS)


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
    return compiled(
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
    snapshot: Account | PointsTransaction | Hold
    if row.snapshot is None:
        snapshot = as_posted(transaction_of(row))
    elif row.event_type in HOLD_EVENT_TYPES:
        snapshot = from_json(Hold, row.snapshot)
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


# The channel migration 0002's trigger notifies when the event log's head moves: once per
# pass of the sequencer.
EVENTS_CHANNEL = "loyalty_events"


async def listen_for_events(conn: Conn) -> None:
    await conn.execute(f"LISTEN {EVENTS_CHANNEL}")


_OLDEST_AND_HEAD = compiled(
    sa.select(
        sa.select(sa.func.min(events.c.position)).scalar_subquery().label("oldest"),
        event_log_head.c.position.label("head"),
    )
)


_EVENT_TIME = compiled(
    sa.select(events.c.create_time).where(events.c.position == sa.bindparam("position"))
)


_PRUNE_EVENTS = compiled(
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
    row = await one(conn, _OLDEST_AND_HEAD, {})
    assert row is not None
    if row.oldest is None:
        return 0
    low, high = row.oldest, row.head + 1  # the first position to keep is in [low, high]
    while low < high:
        middle = (low + high) // 2
        time_row = await one(conn, _EVENT_TIME, {"position": middle})
        if time_row is not None and time_row.create_time >= before:
            high = middle
        else:  # older, or just pruned by another replica
            low = middle + 1
    pruned = 0
    for cut in range(row.oldest + _PRUNE_CHUNK, low + _PRUNE_CHUNK, _PRUNE_CHUNK):
        cursor = await conn.execute(_PRUNE_EVENTS, {"before": min(cut, low)})
        pruned += cursor.rowcount
    return pruned
