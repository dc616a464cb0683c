"""Helpers for use-case tests: a ledger on a real PostgreSQL, without gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import psycopg

from loyalty_service import db, store
from loyalty_service.db import libpq_url
from loyalty_service.ledger import Ledger
from loyalty_service.ledger.checks import find_violations


def run(url: str, scenario: Callable[[Ledger], Awaitable[None]]) -> None:
    """Runs `scenario` on a ledger over a pool of its own, then checks the invariants."""

    async def main() -> None:
        async with db.create_pool(url, size=4) as pool:
            await scenario(Ledger(pool))
            assert await find_violations(pool) == []

    asyncio.run(main())


async def sequence(ledger: Ledger) -> None:
    """Gives every queued event its position, as a server's sequencer does
    (ledger.sequencer)."""
    async with db.connection(ledger.pool) as conn:
        while await store.events.sequence_events(conn, 1_000):
            pass


async def autocommit_connection(url: str) -> psycopg.AsyncConnection:
    """A connection of its own (another writer, a sequencer), as the pool's: autocommit, rows
    as named tuples."""
    return await psycopg.AsyncConnection.connect(
        libpq_url(url), autocommit=True, row_factory=psycopg.rows.namedtuple_row
    )
