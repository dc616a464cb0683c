"""The `checkout` scenario of `make bench` (benchmarks/run.py): a checkout that pays partly
with points, as checkout calls the service: CreateHold at authorisation, CaptureHold at
settlement, RecordPayment for the card's part.

Two programs alike (as the payment scenario's: auto_enroll, 1 point per EUR, a welcome
bonus of 100), each with 10,000 members already enrolled and funded (`seed`), one for the
service and one for pgbench. Each iteration: a hold of 1 to 100 points on a random member,
its capture (all of it, with a request id), and a payment of 5 to 200 EUR by a random
member.

The load generator drives one method at a time, so the service's side runs the three in
turn, each for a window: the holds, then the captures of holds made beforehand with the
same SQL function (as many as the window can take), then the payments. Its checkouts per
second are those of a client that makes the three calls one after another at each of the
same number of slots: 1 / (1/holds + 1/captures + 1/payments). The baseline is pgbench
running, per transaction, the statements the service runs for the three: create_hold's
call, finish_hold's call, and the payment's statements (benchmarks/payments.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import psycopg

from benchmarks import payments
from loyalty_service import db, store
from loyalty_service.domain.ids import MAX_BALANCE
from loyalty_service.pb import points_pb2

CREATE_HOLD = "/vinr.loyalty.v1.PointsLedger/CreateHold"
CAPTURE_HOLD = "/vinr.loyalty.v1.PointsLedger/CaptureHold"
SERVICE_PROGRAM = "prog_bench_checkout"
BASELINE_PROGRAM = "prog_bench_checkout_pgbench"
PREFIXES = {SERVICE_PROGRAM: "chks", BASELINE_PROGRAM: "chkb"}
BALANCE = 10**12  # enough points for any number of checkouts
MAX_HOLD = 100


def member(program: str, n: int) -> str:
    """The account of customer n (payments.customer) in `program`: `loy_` and 20 characters."""
    return f"loy_{PREFIXES[program]}{n:016d}"


def seed(url: str, program: str, customers: int) -> None:
    """Members 1..customers of `program`, inserted directly and funded: the scenario measures
    checkout, not enrolment."""
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO accounts (id, program_id, customer, status, balance, lifetime_points,
                                  tier, metadata, create_time, update_time, version)
            SELECT 'loy_' || %(prefix)s || lpad(n::text, 16, '0'), %(program)s,
                   'cust_pay_' || n, 'ACTIVE', %(balance)s, %(balance)s, '', '{}', now(),
                   now(), 1
            FROM generate_series(1, %(customers)s) AS n
            """,
            {
                "prefix": PREFIXES[program],
                "program": program,
                "customers": customers,
                "balance": BALANCE,
            },
        )
        conn.execute("ANALYZE accounts")


def hold_requests(run: str, count: int, customers: int) -> Iterator[bytes]:
    for i in range(count):
        yield points_pb2.CreateHoldRequest(
            account=member(SERVICE_PROGRAM, random.randint(1, customers)),
            amount=random.randint(1, MAX_HOLD),
            reference=f"auth_{run}_{i}",
            reason="checkout",
        ).SerializeToString()


def make_holds(url: str, run: str, count: int, customers: int) -> list[str]:
    """`count` holds made with create_hold, as CreateHold makes them, for the captures'
    window; their ids."""
    request = _hold_request(
        f"'loy_{PREFIXES[SERVICE_PROGRAM]}' || lpad((1 + mod(g.i, %(customers)s))::text, 16, '0')",
        "(%(run)s || g.i::text)",
        "(1 + mod(g.i, 100))::bigint",
    )
    call = store.holds.hold_call("create_hold", request)
    sql = (
        "SELECT h.hold ->> 'id' AS id FROM generate_series(1, %(count)s) AS g(i),"
        f" LATERAL ({call}) AS h"
    )
    params = {"count": count, "run": f"pre_{run}_", "customers": customers}
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        return [row[0] for row in conn.execute(sql, params)]


def capture_requests(run: str, hold_ids: list[str]) -> Iterator[bytes]:
    for i, hold_id in enumerate(hold_ids):
        yield points_pb2.CaptureHoldRequest(
            id=hold_id, request_id=f"capture_{run}_{i}"
        ).SerializeToString()


def _hold_request(account: str, k: str, held: str) -> dict[str, str]:
    """create_hold's request as CreateHold sends it, in SQL expressions: a hold of `held`
    points on `account`, its ids drawn from `k`."""
    return {
        "id": f"'hold_' || substr(md5('hold' || {k}), 1, 20)",
        "account_id": account,
        "program_ids": "NULL::jsonb",
        "reference": f"'auth_' || {k}",
        "amount": held,
        "reason": "'checkout'",
        "metadata": "'{}'::jsonb",
        "create_time": "now()",
        "ttl_seconds": "NULL::bigint",
        "fingerprint": f"md5('fp' || {k})",
        "actor": "'anonymous'",
        "event_id": f"'evt_' || substr(md5('held' || {k}), 1, 20)",
    }


def pgbench_script(
    program: payments.programs_pb2.Program,
    customers: int,
    statement: Callable[[str, dict[str, str]], str],
) -> str:
    """A checkout as pgbench runs it: the hold's and the capture's calls as the store makes
    them (store.holds.hold_call), each one autocommit statement, then the payment's
    transaction (payments.pgbench_script) by a random member."""
    hold_id = "'hold_' || substr(md5('hold' || :k::text), 1, 20)"
    redeem = {
        "idx": "0", "id": "'ptx_' || substr(md5('redeem' || :k::text), 1, 20)",
        # Filled in by finish_hold from the hold's row, as for the service's capture.
        "account_id": "''", "amount": "0", "delta": "0", "reason": "''", "metadata": "'{}'::jsonb",
        "type": "'REDEEM'", "direction": "'DEBIT'", "lifetime_delta": "0", "min_balance": "0",
        "max_balance": str(MAX_BALANCE), "closed_ok": "false", "origin_kind": "'REDEMPTION'",
        "origin_id": hold_id, "reverses_id": "NULL::text", "rule_id": "NULL::text",
        "rule_version": "NULL::int", "create_time": "now()", "key": "NULL::text",
        "fingerprint": "NULL::text", "actor": "'anonymous'",
        "event_id": "'evt_' || substr(md5('redeemed' || :k::text), 1, 20)",
    }  # fmt: skip
    capture = {
        "action": "'CAPTURE'",
        "hold_id": hold_id,
        "amount": "NULL::bigint",
        "at": "now()",
        "actor": "'anonymous'",
        "program_ids": "NULL::jsonb",
        # chr(58) is ':', which pgbench would read as the start of a variable's name.
        "key": "'anonymous' || chr(31) || 'CaptureHold' || chr(58) || 'capture_' || :k::text",
        "fingerprint": "md5('capture' || :k::text)",
        "event_id": "'evt_' || substr(md5('captured' || :k::text), 1, 20)",
        "posting": store.sql.jsonb_object(redeem, store.postings.POSTING_KEYS),
    }
    account = f"'loy_{PREFIXES[BASELINE_PROGRAM]}' || lpad(:hn::text, 16, '0')"
    hold = _hold_request(account, ":k::text", ":held::bigint")
    lines = [
        "\\set k random(1, 9000000000000000000)",
        f"\\set hn random(1, {customers})",
        f"\\set held random(1, {MAX_HOLD})",
        statement(store.holds.hold_call("create_hold", hold), {}) + ";",
        statement(store.holds.hold_call("finish_hold", capture), {}) + ";",
    ]
    return "\n".join(lines) + "\n" + payments.pgbench_script(program, customers, statement)
