"""CPU per payment, without gRPC: `.venv/bin/python -m benchmarks.payment_cpu`.

On a fresh embedded PostgreSQL, records 1,600 payments through the ledger's use case
(PaymentUseCases.record_payment), 16 at a time on a pool of 10 connections, as the
`payment` scenario of `make bench` does through the server: a program with auto-enrollment,
1 point per EUR and a welcome bonus, 10,000 customers, so that most payments enroll. Prints
the CPU this process and PostgreSQL's backends spent per payment, and payments per second
(docs/benchmarks.md, Results). The server's `CPU` line in `make bench` adds gRPC's work and
its per-second costs; this is the use case's own.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime

from benchmarks.postings import on_fresh_database
from benchmarks.run import cpu_seconds
from loyalty_service import db
from loyalty_service.domain.payments import NewPayment
from loyalty_service.domain.programs import EarningRule, NewProgram, RuleTrigger
from loyalty_service.ledger import Ledger

CUSTOMERS = 10_000
IN_FLIGHT = 16
PAYMENTS = 100  # per caller in flight


async def measure(url: str) -> None:
    async with db.create_pool(url, size=10) as pool:
        ledger = Ledger(pool)
        rules = [
            EarningRule(RuleTrigger.PAYMENT_COMPLETED, name="1 per EUR", points_per_unit="1"),
            EarningRule(RuleTrigger.ACCOUNT_CREATED, name="welcome", points=100),
        ]
        new = NewProgram("Payments", "EUR", auto_enroll=True, earning_rules=rules)
        program = await ledger.create_program(None, new)
        count = 0

        def payment() -> NewPayment:
            nonlocal count
            count += 1
            return NewPayment(
                id=f"pay_{count}",
                program=program.id,
                customer=f"cust_{random.randint(1, CUSTOMERS)}",
                amount=random.randint(500, 20_000),
                currency="EUR",
                occurred_at=datetime.now(UTC),
            )

        async def pay(times: int) -> None:
            for _ in range(times):
                await ledger.record_payment(payment())

        await asyncio.gather(*[pay(10) for _ in range(IN_FLIGHT)])  # warm up
        async with db.connection(pool) as conn:
            cursor = await conn.execute("SELECT pg_backend_pid() AS pid")
            this = (await cursor.fetchone()).pid
            cursor = await conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> %s",
                [this],
            )
            backends = [row.pid for row in await cursor.fetchall()] + [this]
        database, client = sum(cpu_seconds(p) for p in backends), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*[pay(PAYMENTS) for _ in range(IN_FLIGHT)])
        elapsed = time.perf_counter() - started
        total = IN_FLIGHT * PAYMENTS
        database = (sum(cpu_seconds(p) for p in backends) - database) / total * 1e6
        client = (time.process_time() - client) / total * 1e6
        print(
            f"payment: this process {client:.0f} us, PostgreSQL {database:.0f} us per payment;"
            f" {total / elapsed:.0f} payments/s"
        )


def main() -> None:
    on_fresh_database(measure)


if __name__ == "__main__":
    main()
