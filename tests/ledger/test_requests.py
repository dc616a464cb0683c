"""Request ids as use cases keep them, on a real PostgreSQL without gRPC: kept for the
retention period, then pruned."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from loyalty_service import db
from loyalty_service.domain.callers import ANYONE
from loyalty_service.ledger import Ledger


class StepClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_request_ids_are_kept_for_the_retention_period(databases):
    url = databases.create()

    async def scenario() -> None:
        clock = StepClock(datetime(2026, 1, 1, tzinfo=UTC))
        async with db.create_pool(url, size=2) as pool:
            ledger = Ledger(pool, clock)
            account = await ledger.create_account(ANYONE, "prog_default", "c1", {}, "req-1")
            clock.now += timedelta(hours=47)
            assert await ledger.prune_request_ids(timedelta(hours=48)) == 0
            replay = await ledger.create_account(ANYONE, "prog_default", "c1", {}, "req-1")
            assert replay == account

            clock.now += timedelta(hours=2)
            assert await ledger.prune_request_ids(timedelta(hours=48)) == 1
            async with pool.connection() as conn:
                cursor = await conn.execute("SELECT count(*) AS n FROM idempotency_keys")
                assert (await cursor.fetchone()).n == 0

    asyncio.run(scenario())
