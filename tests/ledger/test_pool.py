"""The connection pool: what it lets a call reuse, and how long a call waits for it."""

from __future__ import annotations

import asyncio

import pytest
from psycopg import pq
from psycopg_pool import PoolTimeout

from loyalty_service import db


def test_a_connection_left_in_pipeline_mode_is_never_reused(database_url):
    """When psycopg cannot take a connection out of pipeline mode (a pipeline cut off by a
    network failure with results not collected), it logs a warning and forgets the
    pipeline, but libpq stays in pipeline mode. Reused, such a connection answers an
    autocommit statement inside an implicit transaction that nothing commits: a posting
    would be acknowledged, then rolled back. The pool closes it instead."""

    async def scenario() -> None:
        async with db.create_pool(database_url, size=1) as pool:
            conn = await pool.getconn()
            conn.pgconn.enter_pipeline_mode()  # the state such a failure leaves behind
            await pool.putconn(conn)
            again = await pool.getconn()
            assert again is not conn and conn.closed
            assert again.pgconn.pipeline_status == pq.PipelineStatus.OFF
            await again.execute("SELECT 1")
            await pool.putconn(again)

    asyncio.run(scenario())


def test_waits_for_a_connection_end_at_the_call_deadline_or_when_the_database_is_down(
    database_url,
):
    async def scenario() -> None:
        async with db.create_pool(database_url, size=1, timeout=5) as pool:
            held = await pool.getconn()
            loop = asyncio.get_running_loop()
            db.call_deadline.set(loop.time() + 0.3)
            started = loop.time()
            with pytest.raises(PoolTimeout):
                await pool.getconn()
            assert loop.time() - started < 1
            db.call_deadline.set(loop.time() - 1)  # already past: no wait at all
            with pytest.raises(PoolTimeout):
                await pool.getconn()
            db.call_deadline.set(None)
            pool.reachable = False
            started = loop.time()
            with pytest.raises(db.DatabaseUnreachable):
                await pool.getconn()
            assert loop.time() - started < 0.1
            await pool.putconn(held)

    asyncio.run(scenario())
