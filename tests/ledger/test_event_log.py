"""The event log's positions (migration 0009): writers queue their events, sequencer passes
give them positions. On a real PostgreSQL, without gRPC: each account's events follow the
order its changes committed, and passes that race (as two replicas that both believed
themselves elected would run them) never move an event twice or leave a gap."""

from __future__ import annotations

import asyncio

import psycopg

from loyalty_service import db, store
from loyalty_service.domain.callers import ANYONE
from loyalty_service.domain.points import Direction, TransactionType
from loyalty_service.ledger import Ledger
from tests.ledger.support import autocommit_connection, run, sequence
from tests.ledger.test_kernel import posting

EARN = (TransactionType.EARN, Direction.CREDIT)


async def _transaction_events(conn: psycopg.AsyncConnection, account: str) -> list[tuple]:
    """(position, transaction id, points_after) of the account's transaction events."""
    cursor = await conn.execute(
        "SELECT e.position, t.id, t.points_after FROM events e"
        " JOIN points_transactions t ON t.id = e.transaction_id"
        " WHERE e.account_id = %s ORDER BY e.position",
        [account],
    )
    return [tuple(row) for row in await cursor.fetchall()]


def test_an_accounts_events_follow_its_commits_when_the_later_took_its_xid_first(databases):
    """The later committer began first and took its transaction id first, then waited on
    the account's row lock (as a payment does after claiming its payment id): its event
    still comes after the earlier committer's, since the queue's order is taken when the
    events are logged, after the lock."""
    url = databases.create()

    async def scenario(ledger: Ledger) -> None:
        account = (await ledger.create_account(ANYONE, "prog_default", None, {})).id
        async with (
            await autocommit_connection(url) as first,
            await autocommit_connection(url) as later,
        ):
            async with later.transaction():
                await later.execute("SELECT pg_current_xact_id()")  # the older transaction id
                async with first.transaction():
                    (done,) = await store.postings.post(first, [posting(account, *EARN, 5)])
                    # Waits on the account's lock, which `first` holds until it commits.
                    waiting = asyncio.create_task(
                        store.postings.post(later, [posting(account, *EARN, 7)])
                    )
                    await asyncio.sleep(0.3)
                    assert not waiting.done()
                (posted,) = await waiting
            assert (done.points_after, posted.points_after) == (5, 12)
            await sequence(ledger)
            events = await _transaction_events(first, account)
        assert [(position, after) for position, _, after in events] == [(2, 5), (3, 12)]

    run(url, scenario)


def test_passes_that_race_never_move_an_event_twice_nor_leave_a_gap(databases):
    """Four sequencers at once, none holding the election's lock, while 8 writers post: the
    head's row lock keeps their passes apart. Every posting's event is in the log once, at
    positions 1..N, each account's in the order of its postings."""
    url = databases.create()
    accounts, writers, postings = 5, 8, 40

    async def scenario(ledger: Ledger) -> None:
        ids = [
            (await ledger.create_account(ANYONE, "prog_default", None, {})).id
            for _ in range(accounts)
        ]
        writing = True

        async def write(index: int) -> None:
            async with db.connection(ledger.pool) as conn:
                for n in range(postings):
                    account = ids[(index + n) % accounts]
                    await store.postings.post(conn, [posting(account, *EARN, 1)])

        async def sequencer() -> int:
            moved = 0
            async with await autocommit_connection(url) as conn:
                while writing:
                    moved += await store.events.sequence_events(conn, 7)
                moved += await store.events.sequence_events(conn, 10_000)
            return moved

        sequencers = [asyncio.create_task(sequencer()) for _ in range(4)]
        await asyncio.gather(*(write(i) for i in range(writers)))
        writing = False
        moved = sum(await asyncio.gather(*sequencers))
        total = accounts + writers * postings  # each account's creation, then the postings
        assert moved == total
        async with await autocommit_connection(url) as conn:
            cursor = await conn.execute(
                "SELECT count(*) AS n, min(position) AS low, max(position) AS high,"
                " count(DISTINCT id) AS ids, (SELECT position FROM event_log_head) AS head,"
                " (SELECT count(*) FROM event_queue) AS queued FROM events"
            )
            log = await cursor.fetchone()
            assert (log.n, log.low, log.high, log.ids, log.head, log.queued) == (
                total, 1, total, total, total, 0
            )  # fmt: skip
            for account in ids:
                events = await _transaction_events(conn, account)
                assert [after for _, _, after in events] == list(range(1, len(events) + 1))

    run(url, scenario)
