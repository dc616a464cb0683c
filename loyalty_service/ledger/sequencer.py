"""The event sequencer: one replica at a time gives queued events their positions in the log.

Writers append their events to the queue (store.events.log_events); every replica runs an
EventSequencer, and the one whose connection holds the sequencer's advisory lock makes the
passes (store.events.sequence_events), each one transaction that moves what has committed
into the log and notifies the feeds once. The others try for the lock every
ELECTION_INTERVAL: when the holder's process dies or its connection is cut, PostgreSQL
releases the lock with the session, and another replica takes over within about that time.

The advisory lock only elects; it is not what keeps two passes apart. A pass holds the
event log head's row lock and reads the queue after taking it, so even two sequencers that
both believed themselves elected could not move a row twice or give out a position twice
(docs/architecture.md, "The event log").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import psycopg
from psycopg_pool import AsyncConnectionPool

from .. import db, store

log = logging.getLogger(__name__)


# Seconds a queued event may wait for its position before replicas warn about it.
LAGGING = 5.0


# Seconds from a pass that caught up to the next: the most the sequencer adds to an event's
# delivery. A look at an empty queue is one index probe, and writes nothing.
PASS_INTERVAL = 0.01
# Seconds between tries for the lock by a replica that does not hold it: about the longest
# the log waits for a new sequencer after the last one is gone.
ELECTION_INTERVAL = 0.5
# Events moved per pass, at most.
MAX_EVENTS = 5_000
# Seconds a pass may take before PostgreSQL cancels it (the connection then starts again,
# and with it the election).
STATEMENT_TIMEOUT = 10.0
# Seconds a sequencer's session may sit idle before PostgreSQL ends it (see _connect).
IDLE_SESSION_TIMEOUT = 5.0


class EventSequencer:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-sequencer")

    async def close(self) -> None:
        """Stops; if this replica sequences, after a last pass for what its calls wrote
        (another replica takes over anyway, within ELECTION_INTERVAL)."""
        self._stopping.set()
        if self._task is not None:
            # Past the timeout, wait_for cancels it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._task, STATEMENT_TIMEOUT)

    async def _connect(self) -> psycopg.AsyncConnection:
        timeout_ms = int(STATEMENT_TIMEOUT * 1000)
        # idle_session_timeout: a session of ours is never idle for long (a pass every
        # PASS_INTERVAL, a try for the lock every ELECTION_INTERVAL), so PostgreSQL ends one
        # whose process vanished without closing its connection (its host lost), and with
        # it the lock, instead of keeping it until TCP gives up, hours later.
        return await psycopg.AsyncConnection.connect(
            db.libpq_url(self.database_url),
            autocommit=True,
            application_name="loyalty-event-sequencer",
            row_factory=psycopg.rows.namedtuple_row,
            connect_timeout=int(STATEMENT_TIMEOUT),
            options=(
                f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}"
                f" -c idle_session_timeout={int(IDLE_SESSION_TIMEOUT * 1000)}"
            ),
        )

    async def _run(self) -> None:
        while not self._stopping.is_set():
            leading = False
            try:
                async with await self._connect() as conn:
                    while not await _try_lock(conn):
                        await self._watch(conn)
                        if await self._stopped_within(ELECTION_INTERVAL):
                            return
                    leading = True
                    log.info("this replica sequences the event log")
                    await self._sequence(conn)
            except Exception as error:  # whatever it was, the next connection starts afresh
                log.warning("event sequencer stopped, starting again: %r", error)
            finally:
                if leading:
                    log.info("this replica no longer sequences the event log")
            await self._stopped_within(ELECTION_INTERVAL)

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _watch(self, conn: psycopg.AsyncConnection) -> None:
        """A replica that does not sequence says so when nobody seems to: the oldest queued
        event has waited longer than LAGGING."""
        oldest = await store.events.oldest_queued(conn)
        if oldest is not None:
            waited = (datetime.now(UTC) - oldest).total_seconds()
            if waited > LAGGING:
                log.warning("the oldest queued event has waited %.1f s for a position", waited)

    async def _sequence(self, conn: psycopg.AsyncConnection) -> None:
        """Passes until stopped, then one more: the last calls' events."""
        while True:
            stopping = self._stopping.is_set()
            started = time.monotonic()
            # Also on this side: a connection whose server went silent fails the pass.
            async with asyncio.timeout(STATEMENT_TIMEOUT + ELECTION_INTERVAL):
                moved = await store.events.sequence_events(conn, MAX_EVENTS)
            took = time.monotonic() - started
            if took > 1.0:
                log.warning("a pass of the event sequencer took %.1f s", took)
            if moved == MAX_EVENTS:
                continue  # behind: the next pass at once
            if stopping:
                return
            # Caught up: whatever commits meanwhile goes in the next pass together, so that
            # under load a pass (a commit, a notification, a read by every feed) carries
            # many events rather than a few.
            await asyncio.sleep(PASS_INTERVAL)


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


async def _try_lock(conn: psycopg.AsyncConnection) -> bool:
    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s) AS taken", [db.SEQUENCER_LOCK_ID])
    row = await cursor.fetchone()
    assert row is not None
    return bool(row.taken)
