"""Background jobs that run on one replica at a time: the event sequencer, the hold expiry.

Every replica runs every job; for each, the one whose connection holds the job's advisory
lock makes the passes, on that connection. The others try for the lock every
ELECTION_INTERVAL: when the holder's process dies or its connection is cut, PostgreSQL
releases the lock with the session, and another replica takes over within about that time.

The lock only elects. What keeps two passes from doing one thing twice is in each pass's
own statements (row locks, and rows that a pass changes so that the next no longer finds
them), so that two replicas that both believed themselves elected could not either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import psycopg

from .. import db

log = logging.getLogger(__name__)


# Seconds between tries for the lock by a replica that does not hold it: about the longest
# a job waits for a new runner after the last one is gone.
ELECTION_INTERVAL = 0.5
# Seconds a pass's statement may take before PostgreSQL cancels it (the connection then
# starts again, and with it the election).
STATEMENT_TIMEOUT = 10.0
# Seconds a job's session may sit idle before PostgreSQL ends it (see _connect).
IDLE_SESSION_TIMEOUT = 5.0


class SingletonJob:
    """A job's loop: elected by `lock_id`, a pass (one_pass) every `interval` seconds, or at
    once while a pass says there is more; on a replica that is not elected, `standby`
    every ELECTION_INTERVAL. With `final_pass`, the elected replica makes one more pass
    when it stops."""

    name = "job"

    def __init__(
        self, database_url: str, lock_id: int, interval: float, *, final_pass: bool = False
    ) -> None:
        self.database_url = database_url
        self.lock_id = lock_id
        self.interval = interval
        self.final_pass = final_pass
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def one_pass(self, conn: psycopg.AsyncConnection) -> bool:
        """Does a bounded part of the work, on the elected connection (autocommit); True if
        more is left."""
        raise NotImplementedError

    async def standby(self, conn: psycopg.AsyncConnection) -> None:
        """What a replica that does not run the job does meanwhile: warns of lag, say."""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        """Stops, after the final pass if there is one (within STATEMENT_TIMEOUT)."""
        self._stopping.set()
        if self._task is not None:
            # Past the timeout, wait_for cancels it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._task, STATEMENT_TIMEOUT)

    async def _connect(self) -> psycopg.AsyncConnection:
        timeout_ms = int(STATEMENT_TIMEOUT * 1000)
        # idle_session_timeout: a session of a job is never idle for long (a pass every
        # interval, a try for the lock every ELECTION_INTERVAL, both shorter), so
        # PostgreSQL ends one whose process vanished without closing its connection (its
        # host lost), and with it the lock, instead of keeping it until TCP gives up, hours
        # later.
        return await psycopg.AsyncConnection.connect(
            db.libpq_url(self.database_url),
            autocommit=True,
            application_name=f"loyalty-{self.name.replace(' ', '-')}",
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
                    while not await _try_lock(conn, self.lock_id):
                        await self.standby(conn)
                        if await self._stopped_within(ELECTION_INTERVAL):
                            return
                    leading = True
                    log.info("this replica runs the %s", self.name)
                    await self._passes(conn)
            except Exception as error:  # whatever it was, the next connection starts afresh
                log.warning("the %s stopped, starting again: %r", self.name, error)
            finally:
                if leading:
                    log.info("this replica no longer runs the %s", self.name)
            await self._stopped_within(ELECTION_INTERVAL)

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _passes(self, conn: psycopg.AsyncConnection) -> None:
        """Passes until stopped (then one more, with final_pass)."""
        while True:
            stopping = self._stopping.is_set()
            if stopping and not self.final_pass:
                return
            started = time.monotonic()
            # Also on this side: a connection whose server went silent fails the pass.
            async with asyncio.timeout(STATEMENT_TIMEOUT + ELECTION_INTERVAL):
                more = await self.one_pass(conn)
            took = time.monotonic() - started
            if took > 1.0:
                log.warning("a pass of the %s took %.1f s", self.name, took)
            if more:
                continue  # behind: the next pass at once
            if stopping:
                return
            await self._stopped_within(self.interval)


async def _try_lock(conn: psycopg.AsyncConnection, lock_id: int) -> bool:
    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s) AS taken", [lock_id])
    row = await cursor.fetchone()
    assert row is not None
    return bool(row.taken)
