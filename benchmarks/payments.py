"""The `payment` scenario of `make bench` (benchmarks/run.py): RecordPayment's load, its
programs, and its pgbench baseline.

Two programs alike, each with auto_enroll on, one payment rule (1 point per EUR) and a
welcome bonus of 100 points: one for the service, one for pgbench, so that both sides start
from the same 10,000 customers, none of them enrolled yet. Each payment has a fresh id and a
random one of those customers; a customer's first payment enrolls them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from loyalty_service import store
from loyalty_service.domain.events import EventType
from loyalty_service.domain.ids import MAX_BALANCE
from loyalty_service.pb import points_pb2, programs_pb2, programs_pb2_grpc

METHOD = "/vinr.loyalty.v1.PointsLedger/RecordPayment"
SERVICE_PROGRAM = "prog_bench_payments"
BASELINE_PROGRAM = "prog_bench_payments_pgbench"
CURRENCY = "EUR"
POINTS_PER_UNIT = "1"
WELCOME_BONUS = 100
MIN_AMOUNT, MAX_AMOUNT = 500, 20_000  # cents
Rule = programs_pb2.EarningRule


def customer(n: int) -> str:
    return f"cust_pay_{n}"


def create_programs(
    channel: grpc.Channel, program_ids: tuple[str, ...] = (SERVICE_PROGRAM, BASELINE_PROGRAM)
) -> dict[str, programs_pb2.Program]:
    """The two programs, through the API (CreateProgram), as a client would set them up."""
    stub = programs_pb2_grpc.LoyaltyProgramsStub(channel)
    created = {}
    for program_id in program_ids:
        program = programs_pb2.Program(
            name=f"Benchmark payments ({program_id})",
            currency=CURRENCY,
            auto_enroll=True,
            earning_rules=[
                Rule(
                    name="1 point per euro",
                    trigger=Rule.TRIGGER_PAYMENT_COMPLETED,
                    points_per_unit=POINTS_PER_UNIT,
                ),
                Rule(name="welcome", trigger=Rule.TRIGGER_ACCOUNT_CREATED, points=WELCOME_BONUS),
            ],
        )
        reply = stub.CreateProgram(
            programs_pb2.CreateProgramRequest(program=program, program_id=program_id)
        )
        if len(reply.earning_rules) != 2:
            raise RuntimeError(f"CreateProgram kept {len(reply.earning_rules)} of 2 earning rules")
        created[program_id] = reply
    return created


def requests(
    run: str, count: int, customers: int, program: str = SERVICE_PROGRAM
) -> Iterator[bytes]:
    """`count` serialized RecordPayment requests, each with a payment_id of its own, for a
    random one of the customers, occurred_at now (when the file is written)."""
    now = Timestamp()
    now.GetCurrentTime()
    for i in range(count):
        yield points_pb2.RecordPaymentRequest(
            payment_id=f"pay_{run}_{i}",
            program=program,
            customer=customer(random.randint(1, customers)),
            amount=random.randint(MIN_AMOUNT, MAX_AMOUNT),
            currency=CURRENCY,
            occurred_at=now,
        ).SerializeToString()


def pgbench_script(
    program: programs_pb2.Program, customers: int, statement: Callable[[str, dict[str, str]], str]
) -> str:
    """The statements the service runs for one RecordPayment (PaymentUseCases.record_payment),
    on the baseline's program, as a pgbench script: one transaction, the same statements
    from store/ in the same order, the same round trips (the service pipelines what needs
    no answer, with the COMMIT). `statement(sql, params)` puts one on a line with pgbench
    expressions for its parameters.

    A customer's first payment runs 6 statements and the COMMIT in 6 round trips (the
    program with the payment id's claim, the account, no CLOSED or merged one, the new
    account, the posting kernel's call with the welcome bonus, the earn and the
    account.created event, then the payment's outcome with the COMMIT); a later one 4
    statements in 4 round trips.

    What the service works out in Python from the program and the locked account (the
    points, the response) is worked out here with pgbench's \\set and SQL expressions over
    the same values; the kernel works out the rest on both sides. Where it differs:
    - the account is found with \\aset (0 rows leave `acct_version` at 0) and the account
      insert also returns the columns the rest needs (RETURNING id, plus balance,
      lifetime_points, create_time, version): pgbench cannot test a text value;
    - a first payment that loses the race to enroll its customer (the insert finds the
      account a concurrent first payment just committed) makes the service roll back and
      start again (ledger.requests.Moved); pgbench, which cannot, locks the account that won
      in the same transaction and goes on (it then has claimed the payment once, not twice);
    - the stored response and the events are built in the statements (jsonb_build_object:
      the same keys and values as domain.codec.to_json), where the service sends them as
      JSON parameters; ids are md5-based (hex) rather than domain.ids.new_id's, the fingerprint is
      a SHA-256 of the payment's random number, and occurred_at is now().
    """
    rules = {rule.trigger: rule for rule in program.earning_rules}
    pay, welcome = rules[Rule.TRIGGER_PAYMENT_COMPLETED], rules[Rule.TRIGGER_ACCOUNT_CREATED]
    assert pay.points_per_unit == "1" and CURRENCY == "EUR", "points = amount / 100 below"

    def text(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    def random_id(prefix: str, salt: str) -> str:
        # 20 characters after the prefix, as domain.ids.new_id, drawn from this payment's :k.
        return f"'{prefix}' || substr(md5('{salt}' || :k::text), 1, 20)"

    now = "now()"
    customer_ = "'cust_pay_' || :n::text"
    payment_id = "'pay_pgbench_' || :k::text"
    account = ":acct_id::text"
    owner = {"program_id": text(program.id), "customer": customer_}
    ids = {
        "bonus": random_id("ptx_", "bonus"),
        "earn": random_id("ptx_", "earn"),
        **{f"evt{i}": random_id("evt_", f"evt{i}") for i in (1, 2, 3)},
    }

    def account_json(balance: str, lifetime: str, version: str, create_time: str) -> str:
        return (
            f"jsonb_build_object('id', {account}, 'program', {text(program.id)}, 'customer',"
            f" {customer_}, 'status', 'ACTIVE', 'balance', {balance}, 'lifetime_points',"
            f" {lifetime}, 'tier', '', 'metadata', '{{}}'::jsonb, 'create_time', {create_time},"
            f" 'update_time', {now}, 'merged_into', NULL::text, 'version', {version},"
            f" 'actor', 'anonymous', 'held_points', 0)"
        )

    def earn(
        idx: str, id_: str, event: str, rule: programs_pb2.EarningRule, points: str
    ) -> dict[str, str]:
        """A rule's EARN as store.postings.post sends it to the kernel
        (domain.payments.earn_postings)."""
        by_payment = rule.trigger == Rule.TRIGGER_PAYMENT_COMPLETED
        return {
            "idx": idx, "id": id_, "account_id": account, "type": "'EARN'",
            "direction": "'CREDIT'", "amount": points, "delta": points, "lifetime_delta": points,
            "min_balance": str(-MAX_BALANCE), "max_balance": str(MAX_BALANCE),
            "closed_ok": "false", "reason": text(rule.name),
            "origin_kind": "'PAYMENT'" if by_payment else "'RULE'",
            "origin_id": payment_id if by_payment else text(rule.id), "reverses_id": "NULL::text",
            "rule_id": text(rule.id), "rule_version": str(rule.version),
            "metadata": "'{}'::jsonb", "create_time": now, "key": "NULL::text",
            "fingerprint": "NULL::text", "actor": "'anonymous'", "event_id": ids[event],
        }  # fmt: skip

    def earn_json(params: dict[str, str], after: str) -> str:
        # As domain.codec.to_json writes a PointsTransaction.
        fields = {
            "id": params["id"], "account": account, "type": "'EARN'", "direction": "'CREDIT'",
            "amount": params["amount"], "points_after": after,
            "reason": params["reason"], "origin_kind": params["origin_kind"],
            "origin_id": params["origin_id"], "metadata": "'{}'::jsonb", "create_time": now,
            "reverses": "NULL::text", "original_account": "NULL::text", "reversed_amount": "0",
            "rule": params["rule_id"], "rule_version": params["rule_version"],
        }  # fmt: skip
        pairs = ", ".join(f"'{name}', {value}" for name, value in fields.items())
        return f"jsonb_build_object({pairs})"

    bonus = earn("0", ids["bonus"], "evt2", welcome, str(welcome.points))
    earned_first = earn("0", ids["earn"], "evt3", pay, ":points::bigint")
    earned_after_bonus = {**earned_first, "idx": "1"}

    def save_payment(transactions: list[tuple[dict[str, str], str]]) -> str:
        """store.payments.SAVE_PAYMENT, with the response as domain.codec.to_json(PaymentResult)
        writes it."""
        payment = (
            f"jsonb_build_object('id', {payment_id}, 'program', {text(program.id)}, 'customer',"
            f" {customer_}, 'amount', :amount::bigint, 'currency', {text(CURRENCY)},"
            f" 'occurred_at', {now}, 'metadata', '{{}}'::jsonb, 'outcome', 'EARNED', 'account',"
            f" {account}, 'enrolled', :enrolled = 1, 'create_time', {now})"
        )
        after = account_json(
            ":earn_after::bigint", ":earn_lifetime::bigint", ":earn_version::bigint",
            ":acct_create_time::timestamptz",
        )  # fmt: skip
        response = (
            f"jsonb_build_object('payment', {payment}, 'transactions',"
            f" jsonb_build_array({', '.join(earn_json(t, after) for t, after in transactions)}),"
            f" 'account', {after})"
        )
        params = {
            "id": payment_id, "outcome": "'EARNED'", "account_id": account,
            "earn_ids": f"ARRAY[{ids['earn']}]", "response": response,
        }  # fmt: skip
        return statement(store.payments.SAVE_PAYMENT, params)

    created = {
        "id": ids["evt1"], "type": f"'{EventType.ACCOUNT_CREATED}'", "create_time": now,
        "program_id": text(program.id), "account_id": account, "transaction_id": "NULL::text",
        "snapshot": account_json("0", "0", "1", now),
    }  # fmt: skip

    def post(postings: list[dict[str, str]], events_before: list[dict[str, str]]) -> str:
        call = store.postings.post_points_call(postings, events_before, snapshots=True)
        return statement(call, {}) + ";"

    returning = "RETURNING accounts.id"
    assert store.accounts.INSERT_ACCOUNT.rstrip().endswith(returning), store.accounts.INSERT_ACCOUNT
    insert_account = (
        store.accounts.INSERT_ACCOUNT.rstrip()
        + ", accounts.balance, accounts.lifetime_points, accounts.create_time, accounts.version"
    )
    new_account = {
        "id": random_id("loy_", "loy"), **owner, "status": "'ACTIVE'", "balance": "0",
        "lifetime_points": "0", "tier": "''", "metadata": "'{}'", "create_time": now,
        "update_time": now, "merged_into": "NULL", "version": "1", "actor": "'anonymous'",
    }  # fmt: skip
    claim = {
        "id": payment_id, **owner, "amount": ":amount::bigint", "currency": text(CURRENCY),
        "occurred_at": now, "metadata": "'{}'",
        "fingerprint": "encode(sha256(convert_to(:k::text, 'UTF8')), 'hex')",
        "create_time": now, "actor": "'anonymous'",
    }  # fmt: skip
    locked = {**owner, "now": now}  # held points as of now (store.rows.ACCOUNT_COLUMNS_AT)
    lock_account = statement(store.accounts.LOCK_ACTIVE_ACCOUNT, locked) + " \\aset acct_"
    lines = [
        "\\set k random(1, 9000000000000000000)",
        f"\\set n random(1, {customers})",
        f"\\set amount random({MIN_AMOUNT}, {MAX_AMOUNT})",
        "\\set points :amount / 100",
        "\\set acct_version 0",
        "\\set enrolled 0",
        # psycopg sends BEGIN with the first statement (pipeline mode).
        "\\startpipeline",
        "BEGIN;",
        statement(store.payments.CLAIM_PAYMENT, claim) + ";",
        "\\endpipeline",
        lock_account,
        "\\if :acct_version = 0",
        statement(store.accounts.FORMER_ACCOUNT, owner) + ";",
        statement(insert_account, new_account) + " \\aset acct_",
        "\\if :acct_version = 0",
        lock_account,  # lost the race to enroll: see the docstring
        "\\else",
        "\\set enrolled 1",
        "\\endif",
        "\\endif",
        f"\\set bonus_after :acct_balance + {welcome.points}",
        f"\\set earn_after :acct_balance + :enrolled * {welcome.points} + :points",
        f"\\set earn_lifetime :acct_lifetime_points + :enrolled * {welcome.points} + :points",
        "\\set earn_version :acct_version + :enrolled + 1",
        # The kernel's call (which queues the events), then the payment's outcome and the
        # COMMIT in one round trip, as the service pipelines them.
        "\\if :enrolled = 1",
        post([bonus, earned_after_bonus], [created]),
        "\\startpipeline",
        save_payment([(bonus, ":bonus_after::bigint"), (earned_after_bonus, ":earn_after::bigint")])
        + ";",
        "COMMIT;",
        "\\endpipeline",
        "\\else",
        post([earned_first], []),
        "\\startpipeline",
        save_payment([(earned_first, ":earn_after::bigint")]) + ";",
        "COMMIT;",
        "\\endpipeline",
        "\\endif",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"
