"""The event sequencer: one replica at a time gives queued events their positions in the log.

Writers append their events to the queue (store.events.log_events); every replica runs an
EventSequencer, a job of one replica at a time (ledger.jobs), and the one elected makes
the passes (store.events.sequence_events), each one transaction that moves what has
committed into the log and notifies the feeds once.

Two passes cannot overlap whatever the election believes: a pass holds the event log
head's row lock and reads the queue after taking it, so even two sequencers that both
believed themselves elected could not move a row twice or give out a position twice
(docs/architecture.md, "The event log").
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import psycopg
from psycopg_pool import AsyncConnectionPool

from .. import db, store
from .jobs import SingletonJob

log = logging.getLogger(__name__)


# Seconds a queued event may wait for its position before replicas warn about it.
LAGGING = 5.0


# Seconds from a pass that caught up to the next: the most the sequencer adds to an event's
# delivery. A look at an empty queue is one index probe, and writes nothing.
PASS_INTERVAL = 0.01
# Events moved per pass, at most.
MAX_EVENTS = 5_000


class EventSequencer(SingletonJob):
    name = "event sequencer"

    def __init__(self, database_url: str) -> None:
        # The final pass: what this replica's last calls wrote gets its positions at once
        # (another replica would take over anyway, within ELECTION_INTERVAL).
        super().__init__(database_url, db.SEQUENCER_LOCK_ID, PASS_INTERVAL, final_pass=True)

    async def one_pass(self, conn: psycopg.AsyncConnection) -> bool:
        # Caught up, it waits PASS_INTERVAL: whatever commits meanwhile goes in the next pass
        # together, so that under load a pass (a commit, a notification, a read by every
        # feed) carries many events rather than a few.
        return await store.events.sequence_events(conn, MAX_EVENTS) == MAX_EVENTS

    async def standby(self, conn: psycopg.AsyncConnection) -> None:
        """A replica that does not sequence says so when nobody seems to: the oldest queued
        event has waited longer than LAGGING."""
        oldest = await store.events.oldest_queued(conn)
        if oldest is not None:
            waited = (datetime.now(UTC) - oldest).total_seconds()
            if waited > LAGGING:
                log.warning("the oldest queued event has waited %.1f s for a position", waited)


# Seconds a read waits, at most, for the events committed before it to get their positions.
SETTLE_TIMEOUT = 1.0


async def settled(pool: AsyncConnectionPool) -> None:
    """Waits until every event committed before the call has its position (normally the
    sequencer's next pass, milliseconds): a ListEvents, or a stream that starts from now,
    then shows everything a writer was told is done, as when writers took positions
    themselves. With no sequencer running it gives up after SETTLE_TIMEOUT, and the read shows
    what has positions; the rest comes later, at higher positions."""
    async with db.connection(pool) as conn:
        last = await store.events.last_queued(conn)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while last is not None and time.monotonic() < deadline:
        await asyncio.sleep(PASS_INTERVAL)
        async with db.connection(pool) as conn:
            if not await store.events.still_queued(conn, last):
                return
