"""Payments through the real server: PointsLedger.RecordPayment and RecordRefund, the earning
rules of programs (LoyaltyPrograms) and the welcome bonus.

Every test makes a program of its own, with the rules it needs, so the tests stay independent
on the shared database."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2

from loyalty_service.pb import accounts_pb2, points_pb2, points_pb2_grpc, programs_pb2
from tests import support
from tests.conftest import ROOT, libpq_url
from tests.events_support import all_events, event_of
from tests.support import (
    ACTIVE,
    CLOSED,
    CREDIT,
    DEBIT,
    EARN,
    FAILED_PRECONDITION,
    INVALID,
    NOT_FOUND,
    REDEEM,
    REVERSE,
    create_account,
    create_program,
    fails,
    failure,
    get,
    grpcurl,
    post,
    program_request,
    program_update,
    reverse,
    unique,
    update_program,
)

PROGRAM = programs_pb2.Program
RULE = programs_pb2.EarningRule
ON_PAYMENT = RULE.TRIGGER_PAYMENT_COMPLETED
ON_CREATED = RULE.TRIGGER_ACCOUNT_CREATED
ARCHIVED = PROGRAM.STATUS_ARCHIVED
Origin = points_pb2.Origin
Payment = points_pb2.Payment
EARNED, GUEST, NOT_ENROLLED, ACCOUNT_CLOSED, NO_POINTS = (
    Payment.OUTCOME_EARNED,
    Payment.OUTCOME_GUEST,
    Payment.OUTCOME_NOT_ENROLLED,
    Payment.OUTCOME_ACCOUNT_CLOSED,
    Payment.OUTCOME_NO_POINTS,
)

ACCOUNT_CREATED = "loyalty.account.created"
TIER_CHANGED = "loyalty.account.tier_changed"
TX_CREATED = "points_transaction.created"
RULE_ID = re.compile(r"rule_[A-Za-z0-9]{20}")
LIMIT = 1_000_000_000

# The times payments happen at: a fixed day, so rule windows can be set around it.
DAY = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


AT = ts(DAY)
_UNSET = object()


# -- helpers ----------------------------------------------------------------------------


def per_unit(points_per_unit: str = "1", **fields) -> programs_pb2.EarningRule:
    """A payment rule."""
    return RULE(trigger=ON_PAYMENT, points_per_unit=points_per_unit, **fields)


def welcome(points: int, **fields) -> programs_pb2.EarningRule:
    """A welcome-bonus rule."""
    return RULE(trigger=ON_CREATED, points=points, **fields)


def new_program(
    programs,
    *rules: programs_pb2.EarningRule,
    currency: str = "EUR",
    auto_enroll: bool = False,
    tiers: tuple[tuple[str, int], ...] = (),
    status: int = 0,
) -> programs_pb2.Program:
    return create_program(
        programs,
        name="Payments",
        currency=currency,
        auto_enroll=auto_enroll,
        tiers=support.tiers(*tiers),
        earning_rules=list(rules),
        status=status,
    )


def set_rules(programs, program_id: str, *rules: programs_pb2.EarningRule) -> programs_pb2.Program:
    return update_program(programs, program_id, ["earning_rules"], earning_rules=list(rules))


def payment(
    program: programs_pb2.Program | str,
    customer: str,
    amount: int,
    *,
    payment_id: str | None = None,
    currency: str | None = None,
    occurred_at=_UNSET,
    metadata: dict[str, str] | None = None,
) -> points_pb2.RecordPaymentRequest:
    if isinstance(program, str):
        program_id, default_currency = program, "EUR"
    else:
        program_id, default_currency = program.id, program.currency
    request = points_pb2.RecordPaymentRequest(
        payment_id=unique("pay") if payment_id is None else payment_id,
        program=program_id,
        customer=customer,
        amount=amount,
        currency=default_currency if currency is None else currency,
        metadata=metadata or {},
    )
    if occurred_at is _UNSET:
        request.occurred_at.CopyFrom(AT)
    elif occurred_at is not None:
        request.occurred_at.CopyFrom(occurred_at)
    return request


def pay(points, *args, **kwargs) -> points_pb2.RecordPaymentResponse:
    return points.RecordPayment(payment(*args, **kwargs))


def refund_request(payment_id: str, amount: int, refund_id: str | None = None):
    return points_pb2.RecordRefundRequest(
        refund_id=unique("ref") if refund_id is None else refund_id,
        payment_id=payment_id,
        amount=amount,
    )


def refund(points, payment_id: str, amount: int, refund_id: str | None = None):
    return points.RecordRefund(refund_request(payment_id, amount, refund_id))


def enroll(accounts, program: programs_pb2.Program, customer: str | None = None):
    return create_account(accounts, customer, program=program.id)


def ledger(points, account: str) -> list[points_pb2.PointsTransaction]:
    """Every transaction of an account, oldest first."""
    found, token = [], ""
    while True:
        page = points.ListPointsTransactions(
            points_pb2.ListPointsTransactionsRequest(
                account=account, page_size=100, page_token=token
            )
        )
        found += page.points_transactions
        token = page.next_page_token
        if not token:
            return found[::-1]


def accounts_of(accounts, program: str, customer: str = "") -> list[accounts_pb2.Account]:
    found, token = [], ""
    while True:
        page = accounts.ListAccounts(
            accounts_pb2.ListAccountsRequest(
                program=program, customer=customer, page_size=100, page_token=token
            )
        )
        found += page.accounts
        token = page.next_page_token
        if not token:
            return found


def events_of(channel, account: str) -> list:
    return [event_of(e) for e in all_events(channel, account=account)]


def assert_earn(
    tx: points_pb2.PointsTransaction,
    *,
    account: str,
    payment_id: str,
    rule: programs_pb2.EarningRule,
    amount: int,
    points_after: int | None = None,
    version: int | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    assert tx.id.startswith("ptx_") and len(tx.id) == 24, tx.id
    assert (tx.account, tx.type, tx.direction, tx.amount) == (account, EARN, CREDIT, amount), tx
    assert (tx.origin.kind, tx.origin.id) == (Origin.KIND_PAYMENT, payment_id), tx
    assert (tx.rule, tx.rule_version) == (rule.id, rule.version if version is None else version)
    assert tx.reason == rule.name
    assert dict(tx.metadata) == (metadata or {})
    assert tx.reverses == ""
    if points_after is not None:
        assert tx.points_after == points_after, tx


def assert_reversal(
    tx: points_pb2.PointsTransaction, *, earn: points_pb2.PointsTransaction, refund_id: str, amount
) -> None:
    assert (tx.type, tx.direction, tx.amount) == (REVERSE, DEBIT, amount), tx
    assert tx.reverses == earn.id
    assert (tx.origin.kind, tx.origin.id) == (Origin.KIND_REFUND, refund_id), tx
    assert tx.account == earn.account


def rule_fields(rule: programs_pb2.EarningRule) -> programs_pb2.EarningRule:
    """The rule without its output-only fields."""
    copy = RULE()
    copy.CopyFrom(rule)
    copy.ClearField("id")
    copy.ClearField("version")
    return copy


# -- rules on programs ------------------------------------------------------------------


def test_create_program_with_rules_returns_them_with_ids_and_version_1(programs):
    rules = [
        welcome(250, name="Welcome"),
        per_unit(
            "1.25",
            name="Base",
            min_amount=500,
            max_points=1000,
            tier_multipliers=[programs_pb2.TierMultiplier(tier="Gold", multiplier="1.5")],
        ),
        per_unit(
            "2", name="Spring promo", start_time=ts(DAY), end_time=ts(DAY + timedelta(days=7))
        ),
    ]
    created = new_program(programs, *rules, tiers=(("Silver", 100), ("Gold", 1000)))

    assert len(created.earning_rules) == 3
    for given, got in zip(rules, created.earning_rules, strict=True):
        assert RULE_ID.fullmatch(got.id), got.id
        assert got.version == 1
        assert rule_fields(got) == given
    assert len({r.id for r in created.earning_rules}) == 3
    assert programs.GetProgram(programs_pb2.GetProgramRequest(id=created.id)) == created


def test_a_decimal_spelled_otherwise_is_no_new_version(programs):
    rule = new_program(
        programs, per_unit("1.5", tier_multipliers=_multiplier("Gold", "2")), tiers=(("Gold", 5),)
    )
    (created,) = rule.earning_rules
    same = per_unit("1.50", id=created.id, tier_multipliers=_multiplier("Gold", "2.0"))
    (kept,) = set_rules(programs, rule.id, same).earning_rules
    assert (kept.id, kept.version) == (created.id, 1)
    changed = per_unit("1.51", id=created.id, tier_multipliers=_multiplier("Gold", "2.0"))
    assert set_rules(programs, rule.id, changed).earning_rules[0].version == 2


def test_every_version_of_a_rule_stays_readable(programs):
    program = new_program(programs, per_unit("1", name="Base"), welcome(5, name="Hello"))
    base, hello = program.earning_rules
    changed = RULE()
    changed.CopyFrom(base)
    changed.points_per_unit = "2"
    (bumped,) = set_rules(programs, program.id, changed).earning_rules  # Hello is removed

    def read(rule_id: str, version: int = 0) -> programs_pb2.EarningRule:
        return programs.GetEarningRule(
            programs_pb2.GetEarningRuleRequest(id=rule_id, version=version)
        )

    assert read(base.id, 1) == base
    assert read(base.id, 2) == bumped == read(base.id)
    assert read(hello.id) == hello == read(hello.id, 1)  # removed, still readable
    missing = fails(
        programs.GetEarningRule,
        programs_pb2.GetEarningRuleRequest(id=base.id, version=3),
        NOT_FOUND,
        "EARNING_RULE_NOT_FOUND",
    )
    assert missing.metadata == {"rule": base.id, "version": "3"}
    fails(
        programs.GetEarningRule,
        programs_pb2.GetEarningRuleRequest(id="rule_" + "x" * 20),
        NOT_FOUND,
        "EARNING_RULE_NOT_FOUND",
    )
    for bad, field in (({"id": "nope"}, "id"), ({"id": base.id, "version": -1}, "version")):
        found = fails(
            programs.GetEarningRule,
            programs_pb2.GetEarningRuleRequest(**bad),
            INVALID,
            "INVALID_ARGUMENT",
        )
        assert set(found.field_violations) == {field}


def test_rule_ids_sent_on_create_are_ignored(programs):
    taken = new_program(programs, per_unit("1")).earning_rules[0].id
    created = new_program(programs, per_unit("1", id=taken), welcome(5, id="not an id"))
    ids = [rule.id for rule in created.earning_rules]
    assert all(RULE_ID.fullmatch(i) for i in ids) and taken not in ids
    assert [rule.version for rule in created.earning_rules] == [1, 1]


def test_update_rules_versions_and_earns_record_the_version_then(accounts, points, programs):
    program = new_program(programs, per_unit("1", name="Base"), per_unit("2", name="Promo"))
    base, promo = program.earning_rules
    member = enroll(accounts, program)
    first = pay(points, program, member.customer, 1000)
    assert [(t.rule, t.rule_version, t.amount) for t in first.points_transactions] == [
        (base.id, 1, 10),
        (promo.id, 1, 20),
    ]

    # Base is sent back as read (unchanged), promo changes, a rule without id is new.
    changed_promo = RULE()
    changed_promo.CopyFrom(promo)
    changed_promo.points_per_unit = "3"
    updated = set_rules(programs, program.id, base, changed_promo, per_unit("0.5", name="New"))
    kept, bumped, added = updated.earning_rules
    assert (kept.id, kept.version) == (base.id, 1)
    assert rule_fields(kept) == rule_fields(base)
    assert (bumped.id, bumped.version, bumped.points_per_unit) == (promo.id, 2, "3")
    assert RULE_ID.fullmatch(added.id) and added.id not in (base.id, promo.id)
    assert (added.version, added.points_per_unit, added.name) == (1, "0.5", "New")
    assert programs.GetProgram(programs_pb2.GetProgramRequest(id=program.id)) == updated

    second = pay(points, program, member.customer, 1000)
    assert [(t.rule, t.rule_version, t.amount) for t in second.points_transactions] == [
        (base.id, 1, 10),
        (promo.id, 2, 30),
        (added.id, 1, 5),
    ]
    # The earns made before the change keep the version they were made by.
    assert [(t.rule, t.rule_version) for t in ledger(points, member.id)[:2]] == [
        (base.id, 1),
        (promo.id, 1),
    ]

    # Sending the same list again changes no version; a renamed rule is a change.
    again = set_rules(programs, program.id, *updated.earning_rules)
    assert [(r.id, r.version) for r in again.earning_rules] == [
        (base.id, 1),
        (promo.id, 2),
        (added.id, 1),
    ]
    renamed = RULE()
    renamed.CopyFrom(kept)
    renamed.name = "Base, renamed"
    # A rule left out is removed; the order given is the new order.
    final = set_rules(programs, program.id, bumped, renamed)
    assert [(r.id, r.version) for r in final.earning_rules] == [(promo.id, 2), (base.id, 2)]
    third = pay(points, program, member.customer, 1000)
    assert [(t.rule, t.rule_version, t.amount, t.reason) for t in third.points_transactions] == [
        (promo.id, 2, 30, "Promo"),
        (base.id, 2, 10, "Base, renamed"),
    ]
    assert get(accounts, member.id).balance == 30 + 45 + 40


def test_rules_with_an_empty_mask_and_with_star(accounts, points, programs):
    program = new_program(programs, per_unit("1"), auto_enroll=True)
    # An empty mask updates the fields that are set: the rules are set.
    replaced = programs.UpdateProgram(
        programs_pb2.UpdateProgramRequest(
            program=PROGRAM(id=program.id, earning_rules=[per_unit("3")])
        )
    )
    (rule,) = replaced.earning_rules
    assert (rule.points_per_unit, rule.version) == ("3", 1)
    assert rule.id != program.earning_rules[0].id
    customer = unique()
    assert [t.amount for t in pay(points, program, customer, 1000).points_transactions] == [30]
    # An empty mask with other fields set leaves the rules alone.
    renamed = programs.UpdateProgram(
        programs_pb2.UpdateProgramRequest(program=PROGRAM(id=program.id, name="Renamed"))
    )
    assert list(renamed.earning_rules) == [rule]
    # `*` replaces everything, the rules included.
    cleared = update_program(programs, program.id, ["*"], name="Star", currency="EUR", status=1)
    assert list(cleared.earning_rules) == []
    assert pay(points, program, customer, 1000).payment.outcome == NO_POINTS


def test_tiers_named_by_multipliers_cannot_be_removed(programs):
    program = new_program(
        programs,
        per_unit("1", tier_multipliers=_multiplier("Silver", "2")),
        tiers=(("Silver", 100), ("Gold", 500)),
    )
    found = fails(
        programs.UpdateProgram,
        program_update(program.id, ["tiers"], tiers=support.tiers(("Gold", 500))),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert found.field_violations, found
    assert programs.GetProgram(programs_pb2.GetProgramRequest(id=program.id)) == program


def test_update_with_an_unknown_rule_id_is_invalid(programs):
    program = new_program(programs, per_unit("1"))
    unknown = "rule_" + "Z" * 20
    found = fails(
        programs.UpdateProgram,
        program_update(program.id, ["earning_rules"], earning_rules=[per_unit("2", id=unknown)]),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert set(found.field_violations) == {"program.earning_rules[0].id"}, found
    # Another program's rule id is unknown here too.
    other = new_program(programs, per_unit("1"))
    found = fails(
        programs.UpdateProgram,
        program_update(
            program.id,
            ["earning_rules"],
            earning_rules=[program.earning_rules[0], other.earning_rules[0]],
        ),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert set(found.field_violations) == {"program.earning_rules[1].id"}, found
    assert programs.GetProgram(programs_pb2.GetProgramRequest(id=program.id)) == program


def test_update_with_a_multiplier_naming_no_tier_is_invalid(programs):
    program = new_program(programs, per_unit("1"), tiers=(("Silver", 100),))
    found = fails(
        programs.UpdateProgram,
        program_update(
            program.id,
            ["earning_rules"],
            earning_rules=[
                per_unit(
                    "1",
                    tier_multipliers=[programs_pb2.TierMultiplier(tier="Gold", multiplier="2")],
                )
            ],
        ),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert set(found.field_violations) == {"program.earning_rules[0].tier_multipliers[0].tier"}


def _multiplier(tier: str, multiplier: str) -> list[programs_pb2.TierMultiplier]:
    return [programs_pb2.TierMultiplier(tier=tier, multiplier=multiplier)]


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        ([per_unit("abc")], "program.earning_rules[0].points_per_unit"),
        ([per_unit("0")], "program.earning_rules[0].points_per_unit"),
        ([per_unit("-1")], "program.earning_rules[0].points_per_unit"),
        ([per_unit("0.00001")], "program.earning_rules[0].points_per_unit"),
        ([per_unit("1.23456")], "program.earning_rules[0].points_per_unit"),
        ([per_unit("1000001")], "program.earning_rules[0].points_per_unit"),
        ([per_unit("")], "program.earning_rules[0].points_per_unit"),
        ([welcome(10), per_unit("1,5")], "program.earning_rules[1].points_per_unit"),
        ([per_unit("1", points=5)], "program.earning_rules[0].points"),
        ([per_unit("1", min_amount=-1)], "program.earning_rules[0].min_amount"),
        ([per_unit("1", max_points=-1)], "program.earning_rules[0].max_points"),
        ([per_unit("1", name="n" * 201)], "program.earning_rules[0].name"),
        ([welcome(0)], "program.earning_rules[0].points"),
        ([welcome(-5)], "program.earning_rules[0].points"),
        ([welcome(LIMIT + 1)], "program.earning_rules[0].points"),
        ([welcome(10, points_per_unit="1")], "program.earning_rules[0].points_per_unit"),
        ([RULE(name="No trigger")], "program.earning_rules[0].trigger"),
        ([per_unit("1"), RULE(trigger=7, points=5)], "program.earning_rules[1].trigger"),
        (
            [per_unit("1", tier_multipliers=_multiplier("Platinum", "2"))],
            "program.earning_rules[0].tier_multipliers[0].tier",
        ),
        (
            [per_unit("1", tier_multipliers=_multiplier("Silver", "0"))],
            "program.earning_rules[0].tier_multipliers[0].multiplier",
        ),
        (
            [per_unit("1", tier_multipliers=_multiplier("Silver", "1.234"))],
            "program.earning_rules[0].tier_multipliers[0].multiplier",
        ),
        (
            [per_unit("1", tier_multipliers=_multiplier("Silver", "101"))],
            "program.earning_rules[0].tier_multipliers[0].multiplier",
        ),
        (
            [
                per_unit(
                    "1",
                    tier_multipliers=_multiplier("Silver", "2") + _multiplier("Silver", "3"),
                )
            ],
            "program.earning_rules[0].tier_multipliers[1].tier",
        ),
        (
            [welcome(5, tier_multipliers=_multiplier("Silver", "2"))],
            "program.earning_rules[0].tier_multipliers",
        ),
        ([per_unit("1") for _ in range(21)], "program.earning_rules"),
        (
            [per_unit("1", start_time=timestamp_pb2.Timestamp(seconds=10**12))],
            "program.earning_rules[0].start_time",
        ),
        (
            [per_unit("1", end_time=timestamp_pb2.Timestamp(seconds=-(10**12)))],
            "program.earning_rules[0].end_time",
        ),
    ],
)
def test_rule_validation(programs, rules, field):
    found = fails(
        programs.CreateProgram,
        program_request(
            name="Invalid rules", tiers=support.tiers(("Silver", 100)), earning_rules=rules
        ),
        INVALID,
        "INVALID_ARGUMENT",
    )
    if field.endswith(".trigger"):
        # Without a known trigger the rule's other fields may be judged too.
        assert field in found.field_violations, found.field_violations
    else:
        assert set(found.field_violations) == {field}, found.field_violations
    assert field in found.message


def test_rule_limits_that_are_allowed(programs):
    created = new_program(
        programs,
        *[per_unit("0.0001"), per_unit("1000000"), welcome(LIMIT)],
        *[per_unit("1") for _ in range(17)],
        tiers=(("Silver", 100),),
    )
    assert len(created.earning_rules) == 20
    multiplied = new_program(
        programs,
        per_unit("1", tier_multipliers=_multiplier("Silver", "100")),
        per_unit("1", tier_multipliers=_multiplier("Silver", "0.01")),
        tiers=(("Silver", 100),),
    )
    assert [r.tier_multipliers[0].multiplier for r in multiplied.earning_rules] == ["100", "0.01"]


# -- earning ----------------------------------------------------------------------------


# The arithmetic of every currency's minor units is tested in tests/domain/test_payments.py;
# here, that the program's currency reaches it.
@pytest.mark.parametrize(
    ("currency", "points_per_unit", "amount", "earned"), [("JPY", "1", 1999, 1999)]
)
def test_points_follow_the_currency_minor_units(
    accounts, points, programs, currency, points_per_unit, amount, earned
):
    program = new_program(programs, per_unit(points_per_unit), currency=currency)
    member = enroll(accounts, program)
    response = pay(points, program, member.customer, amount)
    assert response.payment.outcome == EARNED
    assert [t.amount for t in response.points_transactions] == [earned]
    assert get(accounts, member.id).balance == earned


def test_an_earn_records_the_payment_and_the_rule(channel, accounts, points, programs):
    program = new_program(programs, per_unit("1", name="Base earn"))
    rule = program.earning_rules[0]
    member = enroll(accounts, program)
    payment_id = unique("pay")
    metadata = {"store": "42", "order": "o-7"}
    response = pay(points, program, member.customer, 1999, payment_id=payment_id, metadata=metadata)

    paid = response.payment
    assert (paid.id, paid.program, paid.customer, paid.amount, paid.currency) == (
        payment_id,
        program.id,
        member.customer,
        1999,
        "EUR",
    )
    assert (paid.occurred_at, dict(paid.metadata)) == (AT, metadata)
    assert (paid.outcome, paid.account, paid.enrolled) == (EARNED, member.id, False)
    assert paid.create_time.seconds > 0

    (earn,) = response.points_transactions
    assert_earn(
        earn,
        account=member.id,
        payment_id=payment_id,
        rule=rule,
        amount=19,
        points_after=19,
        metadata=metadata,
    )
    assert points.GetPointsTransaction(points_pb2.GetPointsTransactionRequest(id=earn.id)) == earn
    after = get(accounts, member.id)
    assert response.account == after
    assert (after.balance, after.lifetime_points, after.version) == (19, 19, 2)

    listed = events_of(channel, member.id)
    assert [e.type for e in listed] == [ACCOUNT_CREATED, TX_CREATED]
    assert listed[1].snapshot == earn


def test_min_amount_and_max_points(accounts, points, programs):
    program = new_program(programs, per_unit("1", min_amount=500, max_points=30))
    member = enroll(accounts, program)

    below = pay(points, program, member.customer, 499)
    assert (below.payment.outcome, below.payment.account) == (NO_POINTS, member.id)
    assert list(below.points_transactions) == []
    assert below.account == get(accounts, member.id)
    assert below.account.balance == 0

    at_minimum = pay(points, program, member.customer, 500)
    assert [t.amount for t in at_minimum.points_transactions] == [5]
    capped = pay(points, program, member.customer, 1_000_000)
    assert [t.amount for t in capped.points_transactions] == [30]
    assert get(accounts, member.id).balance == 35


def test_every_matching_rule_applies_in_the_program_order(accounts, points, programs):
    start, end = DAY - timedelta(days=1), DAY + timedelta(days=1)
    program = new_program(
        programs,
        per_unit("2", name="Promo", start_time=ts(start), end_time=ts(end)),
        per_unit("1", name="Base"),
    )
    promo, base = program.earning_rules
    member = enroll(accounts, program)

    inside = pay(points, program, member.customer, 1000, metadata={"k": "v"})
    both = {"account": member.id, "payment_id": inside.payment.id, "metadata": {"k": "v"}}
    first, second = inside.points_transactions
    assert_earn(first, rule=promo, amount=20, points_after=20, **both)
    assert_earn(second, rule=base, amount=10, points_after=30, **both)

    def rules_applied(moment: datetime) -> list[tuple[str, int]]:
        response = pay(points, program, member.customer, 1000, occurred_at=ts(moment))
        assert response.payment.outcome == EARNED
        return [(t.rule, t.amount) for t in response.points_transactions]

    assert rules_applied(start) == [(promo.id, 20), (base.id, 10)]  # inclusive
    assert rules_applied(end - timedelta(microseconds=1)) == [(promo.id, 20), (base.id, 10)]
    assert rules_applied(end) == [(base.id, 10)]  # exclusive
    assert rules_applied(start - timedelta(seconds=1)) == [(base.id, 10)]
    assert rules_applied(DAY + timedelta(days=30)) == [(base.id, 10)]
    assert get(accounts, member.id).balance == 30 * 3 + 10 * 3


def test_a_tier_multiplier_applies_from_the_payment_after_the_promotion(
    channel, accounts, points, programs
):
    program = new_program(
        programs,
        per_unit("1", tier_multipliers=_multiplier("Silver", "2")),
        tiers=(("Silver", 100), ("Gold", 10_000)),
    )
    member = enroll(accounts, program)

    crossing = pay(points, program, member.customer, 15_000)
    assert [t.amount for t in crossing.points_transactions] == [150]  # at 1x
    assert (crossing.account.tier, crossing.account.balance) == ("Silver", 150)
    listed = events_of(channel, member.id)
    assert [e.type for e in listed] == [ACCOUNT_CREATED, TX_CREATED, TIER_CHANGED]
    assert listed[1].snapshot == crossing.points_transactions[0]
    assert listed[2].position == listed[1].position + 1
    assert (listed[2].snapshot.tier, listed[2].snapshot.lifetime_points) == ("Silver", 150)

    after = pay(points, program, member.customer, 1000)
    assert [t.amount for t in after.points_transactions] == [20]  # Silver: 2x
    assert get(accounts, member.id).balance == 170


# -- welcome bonus ----------------------------------------------------------------------


def test_the_welcome_bonus_on_create_account(channel, accounts, points, programs):
    program = new_program(
        programs, welcome(100, name="Welcome"), per_unit("1"), tiers=(("Silver", 50),)
    )
    bonus_rule = program.earning_rules[0]
    created = enroll(accounts, program)
    assert (created.balance, created.lifetime_points, created.version) == (100, 100, 2)
    assert created.tier == "Silver"
    assert get(accounts, created.id) == created

    (bonus,) = ledger(points, created.id)
    assert (bonus.type, bonus.direction, bonus.amount, bonus.points_after) == (
        EARN,
        CREDIT,
        100,
        100,
    )
    assert (bonus.origin.kind, bonus.origin.id) == (Origin.KIND_RULE, bonus_rule.id)
    assert (bonus.rule, bonus.rule_version) == (bonus_rule.id, 1)

    listed = events_of(channel, created.id)
    assert [e.type for e in listed] == [ACCOUNT_CREATED, TX_CREATED, TIER_CHANGED]
    assert (listed[0].snapshot.balance, listed[0].snapshot.version) == (0, 1)
    assert listed[1].snapshot == bonus
    assert listed[2].snapshot == created
    assert [e.position for e in listed] == list(range(listed[0].position, listed[0].position + 3))


def test_the_welcome_bonus_without_a_tier_and_on_a_retried_create(
    channel, accounts, points, programs
):
    program = new_program(programs, welcome(25))
    request = accounts_pb2.CreateAccountRequest(
        program=program.id, customer=unique(), request_id=unique("req")
    )
    created = accounts.CreateAccount(request)
    assert accounts.CreateAccount(request) == created
    assert (created.balance, created.lifetime_points, created.version, created.tier) == (
        25,
        25,
        2,
        "",
    )
    assert [t.amount for t in ledger(points, created.id)] == [25]
    assert [e.type for e in events_of(channel, created.id)] == [ACCOUNT_CREATED, TX_CREATED]


def test_every_welcome_rule_applies_in_order(accounts, points, programs):
    program = new_program(programs, welcome(100), per_unit("1"), welcome(40))
    first, _, second = program.earning_rules
    created = enroll(accounts, program)
    assert (created.balance, created.lifetime_points) == (140, 140)
    assert [(t.rule, t.amount, t.points_after) for t in ledger(points, created.id)] == [
        (first.id, 100, 100),
        (second.id, 40, 140),
    ]


# -- exactly once -----------------------------------------------------------------------


def test_the_same_payment_twice_earns_once(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    request = payment(program, member.customer, 1000, metadata={"a": "b"})
    first = points.RecordPayment(request)
    # The program changes in between; the replay is still the first response.
    set_rules(programs, program.id, per_unit("5"))
    again = points.RecordPayment(request)
    assert again == first
    assert len(ledger(points, member.id)) == 1
    assert get(accounts, member.id).balance == 10


def test_a_replay_is_the_first_response_after_the_program_changed_currency(
    accounts, points, programs
):
    """A guest payment leaves the program without accounts, so its currency may change; the
    same payment sent again is still a replay, not a currency mismatch."""
    program = new_program(programs, per_unit("1"))
    request = payment(program, "", 1000)
    first = points.RecordPayment(request)
    assert first.payment.outcome == GUEST
    update_program(programs, program.id, ["currency"], currency="USD")
    assert points.RecordPayment(request) == first


def test_replays_are_answered_from_the_record_whatever_changed(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    paid_request = payment(program, member.customer, 1000)
    paid = points.RecordPayment(paid_request)
    refund_req = refund_request(paid.payment.id, 500)
    refunded = points.RecordRefund(refund_req)
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=member.id))
    update_program(
        programs, program.id, ["status", "earning_rules"], status=ARCHIVED, earning_rules=[]
    )
    assert points.RecordPayment(paid_request) == paid
    assert points.RecordRefund(refund_req) == refunded
    assert get(accounts, member.id).balance == 5


@pytest.mark.parametrize(
    "change",
    [
        {"amount": 1001},
        {"customer": "someone-else"},
        {"metadata": {"a": "c"}},
        {"occurred_at": ts(DAY + timedelta(seconds=1))},
        {"program": "other"},
    ],
)
def test_a_payment_id_reused_with_other_fields_is_invalid(accounts, points, programs, change):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    first = payment(program, member.customer, 1000, metadata={"a": "b"})
    points.RecordPayment(first)
    other = points_pb2.RecordPaymentRequest()
    other.CopyFrom(first)
    for name, value in change.items():
        if name == "metadata":
            other.metadata.clear()
            other.metadata.update(value)
        elif name == "occurred_at":
            other.occurred_at.CopyFrom(value)
        elif name == "program":
            other.program = new_program(programs, per_unit("1")).id
        else:
            setattr(other, name, value)
    fails(points.RecordPayment, other, INVALID, "PAYMENT_ID_REUSED")
    assert get(accounts, member.id).balance == 10
    assert points.RecordPayment(first).payment.outcome == EARNED


def test_concurrent_identical_payments_earn_once(accounts, points, programs, assert_invariants):
    program = new_program(programs, welcome(7), per_unit("1"), auto_enroll=True)
    customer = unique()
    request = payment(program, customer, 4321)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: points.RecordPayment(request), range(20)))

    first = responses[0]
    assert all(r == first for r in responses)
    assert (first.payment.outcome, first.payment.enrolled) == (EARNED, True)
    assert [t.amount for t in first.points_transactions] == [7, 43]
    (account,) = accounts_of(accounts, program.id, customer)
    assert account.id == first.payment.account
    assert [t.id for t in ledger(points, account.id)] == [t.id for t in first.points_transactions]
    assert (account.balance, account.lifetime_points) == (50, 50)
    assert_invariants()


# -- auto-enrollment --------------------------------------------------------------------


def test_a_first_payment_enrolls_with_the_welcome_bonus(channel, accounts, points, programs):
    program = new_program(programs, welcome(50, name="Hello"), per_unit("1"), auto_enroll=True)
    bonus_rule, rule = program.earning_rules
    customer = unique()
    response = pay(points, program, customer, 1000)

    paid = response.payment
    assert (paid.outcome, paid.enrolled, paid.customer) == (EARNED, True, customer)
    (account,) = accounts_of(accounts, program.id, customer)
    assert paid.account == account.id
    assert (account.program, account.customer, account.status) == (program.id, customer, ACTIVE)
    assert response.account == account
    assert (account.balance, account.lifetime_points, account.version) == (60, 60, 3)

    bonus, earn = response.points_transactions
    assert (bonus.type, bonus.amount, bonus.points_after) == (EARN, 50, 50)
    assert (bonus.origin.kind, bonus.origin.id) == (Origin.KIND_RULE, bonus_rule.id)
    assert (bonus.rule, bonus.rule_version) == (bonus_rule.id, 1)
    assert_earn(earn, account=account.id, payment_id=paid.id, rule=rule, amount=10, points_after=60)
    assert ledger(points, account.id) == [bonus, earn]

    listed = events_of(channel, account.id)
    assert [e.type for e in listed] == [ACCOUNT_CREATED, TX_CREATED, TX_CREATED]
    assert (listed[0].snapshot.balance, listed[0].snapshot.version) == (0, 1)
    assert [e.snapshot for e in listed[1:]] == [bonus, earn]

    # The next payment finds the member.
    later = pay(points, program, customer, 500)
    assert (later.payment.enrolled, later.payment.account) == (False, account.id)
    assert [t.amount for t in later.points_transactions] == [5]
    assert later.account.balance == 65
    assert len(accounts_of(accounts, program.id, customer)) == 1


def test_concurrent_first_payments_make_one_account(accounts, points, programs, assert_invariants):
    program = new_program(programs, welcome(30), per_unit("1"), auto_enroll=True)
    customer = unique()
    requests = [payment(program, customer, 1000 + 100 * i) for i in range(16)]

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(points.RecordPayment, requests))

    (account,) = accounts_of(accounts, program.id, customer)
    assert {r.payment.account for r in responses} == {account.id}
    assert all(r.payment.outcome == EARNED for r in responses)
    assert sum(r.payment.enrolled for r in responses) == 1
    enrolling = next(r for r in responses if r.payment.enrolled)
    assert len(enrolling.points_transactions) == 2
    assert enrolling.points_transactions[0].amount == 30
    assert enrolling.points_transactions[0].origin.kind == Origin.KIND_RULE
    assert all(len(r.points_transactions) == 1 for r in responses if not r.payment.enrolled)
    earned = sum(10 + i for i in range(16))
    assert (account.balance, account.lifetime_points) == (30 + earned, 30 + earned)
    assert len(ledger(points, account.id)) == 17
    assert_invariants()


def test_create_account_racing_first_payments_leaves_one_account(
    accounts, points, programs, assert_invariants
):
    program = new_program(programs, welcome(20), per_unit("1"), auto_enroll=True)
    customer = unique()

    def attempt(i: int):
        if i % 2:
            try:
                return accounts.CreateAccount(
                    accounts_pb2.CreateAccountRequest(program=program.id, customer=customer)
                )
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error
                return None
        return points.RecordPayment(payment(program, customer, 1000))

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(attempt, range(12)))

    (account,) = accounts_of(accounts, program.id, customer)
    created = [r for r in results[1::2] if r is not None]
    paid = results[0::2]
    assert all(r.payment.account == account.id for r in paid)
    assert len(created) + sum(r.payment.enrolled for r in paid) == 1
    assert (account.balance, account.lifetime_points) == (20 + 60, 20 + 60)
    assert_invariants()


def test_two_replicas_racing_one_customer_make_one_account_and_earn_once(
    accounts, points, programs, database_url, start_replica, assert_invariants
):
    """Two server processes on one database: the exactly-once key and the one-account rule
    hold across them, not just within one process."""
    replica = start_replica(database_url)
    program = new_program(programs, welcome(9), per_unit("1"), auto_enroll=True)
    customer = unique()
    shared = payment(program, customer, 5000)
    firsts = [payment(program, customer, 1000 + 100 * i) for i in range(10)]
    with grpc.insecure_channel(replica.address) as channel:
        other = points_pb2_grpc.PointsLedgerStub(channel)

        def send(i: int):
            stub = other if i % 2 else points
            request = shared if i < 10 else firsts[i - 10]
            return stub.RecordPayment(request)

        with ThreadPoolExecutor(20) as pool:
            responses = list(pool.map(send, range(20)))

    assert all(r == responses[0] for r in responses[:10])
    (account,) = accounts_of(accounts, program.id, customer)
    assert {r.payment.account for r in responses} == {account.id}
    assert sum(r.payment.enrolled for r in responses[:1] + responses[10:]) == 1
    earned = 50 + sum(10 + i for i in range(10))
    assert (account.balance, account.lifetime_points) == (9 + earned, 9 + earned)
    assert len(ledger(points, account.id)) == 12
    assert_invariants()


# -- outcomes ---------------------------------------------------------------------------


def test_a_guest_payment_earns_nothing_and_is_recorded(accounts, points, programs):
    program = new_program(programs, welcome(10), per_unit("1"), auto_enroll=True)
    request = payment(program, "", 5000)
    response = points.RecordPayment(request)
    assert (response.payment.outcome, response.payment.account) == (GUEST, "")
    assert (response.payment.customer, response.payment.enrolled) == ("", False)
    assert list(response.points_transactions) == []
    assert not response.HasField("account")
    assert accounts_of(accounts, program.id) == []
    assert points.RecordPayment(request) == response

    # Refunding it succeeds and reverses nothing.
    refunded = refund(points, request.payment_id, 5000)
    assert (refunded.refund.amount, refunded.refund.refunded_amount) == (5000, 5000)
    assert list(refunded.points_transactions) == []
    assert not refunded.HasField("account")


def test_not_enrolled_without_auto_enroll_and_the_outcome_is_kept(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    customer = unique()
    request = payment(program, customer, 1000)
    response = points.RecordPayment(request)
    assert (response.payment.outcome, response.payment.account) == (NOT_ENROLLED, "")
    assert list(response.points_transactions) == []
    assert not response.HasField("account")
    assert accounts_of(accounts, program.id, customer) == []

    # The customer enrolls afterwards: the recorded payment still earned nothing.
    member = enroll(accounts, program, customer)
    assert points.RecordPayment(request) == response
    assert get(accounts, member.id).balance == 0
    assert pay(points, program, customer, 1000).account.balance == 10


def test_an_archived_program_enrolls_no_one_but_its_members_earn(accounts, points, programs):
    program = new_program(programs, welcome(5), per_unit("1"), auto_enroll=True)
    member = enroll(accounts, program)
    update_program(programs, program.id, ["status"], status=ARCHIVED)
    newcomer = unique()
    response = pay(points, program, newcomer, 1000)
    assert (response.payment.outcome, response.payment.enrolled) == (NOT_ENROLLED, False)
    assert accounts_of(accounts, program.id, newcomer) == []

    earned = pay(points, program, member.customer, 1000)
    assert (earned.payment.outcome, earned.payment.account) == (EARNED, member.id)
    assert earned.account.balance == 15


def test_a_closed_account_earns_nothing_and_is_not_replaced(accounts, points, programs):
    program = new_program(programs, welcome(5), per_unit("1"), auto_enroll=True)
    member = enroll(accounts, program)
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=member.id))

    request = payment(program, member.customer, 1000)
    response = points.RecordPayment(request)
    assert (response.payment.outcome, response.payment.account) == (ACCOUNT_CLOSED, "")
    assert response.payment.enrolled is False
    assert list(response.points_transactions) == []
    (only,) = accounts_of(accounts, program.id, member.customer)
    assert (only.id, only.status, only.balance) == (member.id, CLOSED, 5)

    # Reopened, the account earns again; the recorded payment does not.
    accounts.ReopenAccount(accounts_pb2.ReopenAccountRequest(id=member.id))
    assert points.RecordPayment(request) == response
    assert pay(points, program, member.customer, 1000).account.balance == 15


def test_a_closed_account_next_to_an_active_one(accounts, points, programs):
    program = new_program(programs, per_unit("1"), auto_enroll=True)
    old = enroll(accounts, program)
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=old.id))
    new = enroll(accounts, program, old.customer)
    response = pay(points, program, old.customer, 1000)
    assert (response.payment.outcome, response.payment.account) == (EARNED, new.id)
    assert (get(accounts, new.id).balance, get(accounts, old.id).balance) == (10, 0)


def test_enrolling_is_decided_at_the_tier_the_welcome_bonus_gives(accounts, points, programs):
    """A new member earns at the tier its welcome bonus reaches, and a payment enrolls only
    if it earns there."""

    def program_with(multiplier: str) -> programs_pb2.Program:
        return new_program(
            programs,
            welcome(100),
            per_unit("1", tier_multipliers=_multiplier("Silver", multiplier)),
            auto_enroll=True,
            tiers=(("Bronze", 0), ("Silver", 50)),
        )

    # 0.50 EUR: 0 points at 1x (Bronze), 1 at 3x (Silver, after the bonus): it enrolls.
    tripled = program_with("3")
    customer = unique()
    response = pay(points, tripled, customer, 50)
    assert (response.payment.outcome, response.payment.enrolled) == (EARNED, True)
    assert [t.amount for t in response.points_transactions] == [100, 1]
    assert (response.account.tier, response.account.balance) == ("Silver", 101)

    # 10 EUR: 10 points at 1x, 0 at 0.01x (Silver): no points, and no account.
    tiny = program_with("0.01")
    customer = unique()
    response = pay(points, tiny, customer, 1000)
    assert (response.payment.outcome, response.payment.enrolled) == (NO_POINTS, False)
    assert (list(response.points_transactions), response.HasField("account")) == ([], False)
    assert accounts_of(accounts, tiny.id, customer) == []


def test_no_points_does_not_enroll(accounts, points, programs):
    # Below the minimum.
    program = new_program(programs, welcome(5), per_unit("1", min_amount=1000), auto_enroll=True)
    customer = unique()
    request = payment(program, customer, 999)
    below = points.RecordPayment(request)
    assert (below.payment.outcome, below.payment.account, below.payment.enrolled) == (
        NO_POINTS,
        "",
        False,
    )
    assert not below.HasField("account")
    assert accounts_of(accounts, program.id, customer) == []
    assert points.RecordPayment(request) == below

    # No payment rule at all (only a welcome bonus), and no rule at all.
    for rules in ([welcome(5)], []):
        bare = new_program(programs, *rules, auto_enroll=True)
        response = pay(points, bare, customer, 100_000)
        assert (response.payment.outcome, response.payment.enrolled) == (NO_POINTS, False)
        assert accounts_of(accounts, bare.id, customer) == []

    # A refund of such a payment reverses nothing.
    refunded = refund(points, request.payment_id, 999)
    assert list(refunded.points_transactions) == []
    assert not refunded.HasField("account")


# -- errors -----------------------------------------------------------------------------


def test_currency_mismatch_records_nothing(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    payment_id = unique("pay")
    found = fails(
        points.RecordPayment,
        payment(program, member.customer, 1000, payment_id=payment_id, currency="USD"),
        FAILED_PRECONDITION,
        "CURRENCY_MISMATCH",
    )
    assert found.metadata == {"program": program.id, "currency": "EUR", "requested": "USD"}
    fixed = pay(points, program, member.customer, 1000, payment_id=payment_id)
    assert (fixed.payment.outcome, fixed.account.balance) == (EARNED, 10)


def test_unknown_program_records_nothing(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    payment_id = unique("pay")
    missing = "prog_" + "q" * 20
    unknown = payment(missing, member.customer, 1000, payment_id=payment_id)
    found = fails(points.RecordPayment, unknown, NOT_FOUND, "PROGRAM_NOT_FOUND")
    assert found.metadata == {"program": missing}
    # The failed payment left nothing to refund.
    fails(points.RecordRefund, refund_request(payment_id, 10), NOT_FOUND, "PAYMENT_NOT_FOUND")
    fixed = pay(points, program, member.customer, 1000, payment_id=payment_id)
    assert fixed.account.balance == 10
    # Once recorded, the same id with a program that does not exist is a reuse, not a typo.
    reused = fails(points.RecordPayment, unknown, INVALID, "PAYMENT_ID_REUSED")
    assert reused.metadata == {"payment": payment_id}


def test_points_limit_exceeded_records_nothing(accounts, points, programs):
    program = new_program(programs, per_unit("1000000"), auto_enroll=True)
    rule = program.earning_rules[0]
    customer = unique()
    payment_id = unique("pay")
    found = fails(
        points.RecordPayment,
        payment(program, customer, 10**13, payment_id=payment_id),
        FAILED_PRECONDITION,
        "POINTS_LIMIT_EXCEEDED",
    )
    assert found.metadata == {"rule": rule.id, "points": str(10**17), "limit": str(LIMIT)}
    # Nothing was recorded, the enrollment neither.
    assert accounts_of(accounts, program.id, customer) == []
    fixed = pay(points, program, customer, 100, payment_id=payment_id)
    assert [t.amount for t in fixed.points_transactions] == [1_000_000]
    assert fixed.payment.enrolled is True

    # Exactly the limit is allowed; one point more is not.
    at_limit = new_program(programs, per_unit("0.0001"))
    member = enroll(accounts, at_limit)
    assert [
        t.amount for t in pay(points, at_limit, member.customer, 10**15).points_transactions
    ] == [LIMIT]
    over = new_program(programs, per_unit("1"))
    found = fails(
        points.RecordPayment,
        payment(over, enroll(accounts, over).customer, (LIMIT + 1) * 100),
        FAILED_PRECONDITION,
        "POINTS_LIMIT_EXCEEDED",
    )
    assert found.metadata["points"] == str(LIMIT + 1)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"payment_id": ""}, "payment_id"),
        ({"payment_id": "p" * 256}, "payment_id"),
        ({"program": ""}, "program"),
        ({"program": "not-a-program"}, "program"),
        ({"amount": 0}, "amount"),
        ({"amount": -100}, "amount"),
        ({"amount": 10**15 + 1}, "amount"),
        ({"currency": "eur"}, "currency"),
        ({"currency": ""}, "currency"),
        ({"currency": "EURO"}, "currency"),
        ({"occurred_at": None}, "occurred_at"),
        # Past what a timestamp may say (year 9999, whole nanoseconds).
        ({"occurred_at": timestamp_pb2.Timestamp(seconds=10**12)}, "occurred_at"),
        ({"occurred_at": timestamp_pb2.Timestamp(seconds=0, nanos=-1)}, "occurred_at"),
        # PostgreSQL text cannot hold U+0000.
        ({"payment_id": "pay\x00"}, "payment_id"),
        ({"customer": "c\x00"}, "customer"),
        ({"customer": "c" * 256}, "customer"),
        # The metadata goes onto the EARN transactions, with their limits.
        ({"metadata": {f"k{i}": "v" for i in range(51)}}, "metadata"),
        ({"metadata": {"k" * 41: "v"}}, f"metadata[{'k' * 40}]"),  # named as cut
        ({"metadata": {"k": "v" * 501}}, "metadata[k]"),
    ],
)
def test_bad_payment_fields(accounts, points, programs, fields, field):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    request = payment(program, member.customer, 1000, payment_id=unique("pay"))
    bad = points_pb2.RecordPaymentRequest()
    bad.CopyFrom(request)
    for name, value in fields.items():
        if name == "occurred_at" and value is None:
            bad.ClearField("occurred_at")
        elif name == "occurred_at":
            bad.occurred_at.CopyFrom(value)
        elif name == "metadata":
            bad.metadata.update(value)
        else:
            setattr(bad, name, value)
    found = fails(points.RecordPayment, bad, INVALID, "INVALID_ARGUMENT")
    assert set(found.field_violations) == {field}, found.field_violations
    assert field in found.message
    assert get(accounts, member.id).balance == 0
    # A corrected retry with the same payment id succeeds.
    if request.payment_id == bad.payment_id:
        assert points.RecordPayment(request).account.balance == 10


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"refund_id": ""}, "refund_id"),
        ({"refund_id": "r" * 256}, "refund_id"),
        ({"payment_id": ""}, "payment_id"),
        ({"amount": 0}, "amount"),
        ({"amount": -1}, "amount"),
        ({"refund_id": "ref\x00"}, "refund_id"),
        ({"amount": 10**15 + 1}, "amount"),
        ({"payment_id": "p" * 256}, "payment_id"),
        ({"payment_id": "pay\x00"}, "payment_id"),
    ],
)
def test_bad_refund_fields(accounts, points, programs, fields, field):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 1000)
    request = refund_request(paid.payment.id, 1000)
    bad = points_pb2.RecordRefundRequest()
    bad.CopyFrom(request)
    for name, value in fields.items():
        setattr(bad, name, value)
    found = fails(points.RecordRefund, bad, INVALID, "INVALID_ARGUMENT")
    assert set(found.field_violations) == {field}, found.field_violations
    assert get(accounts, member.id).balance == 10
    assert points.RecordRefund(request).account.balance == 0


# -- refunds ----------------------------------------------------------------------------


def test_refunds_reverse_in_proportion_down_to_zero(channel, accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 1000)
    (earn,) = paid.points_transactions
    assert earn.amount == 10
    payment_id = paid.payment.id

    def refunded(amount: int, refunded_amount: int, reversed_now: int, balance: int):
        refund_id = unique("ref")
        response = refund(points, payment_id, amount, refund_id)
        assert (response.refund.id, response.refund.payment_id) == (refund_id, payment_id)
        assert (response.refund.amount, response.refund.refunded_amount) == (
            amount,
            refunded_amount,
        )
        assert response.refund.create_time.seconds > 0
        (reversal,) = response.points_transactions
        assert_reversal(reversal, earn=earn, refund_id=refund_id, amount=reversed_now)
        assert reversal.points_after == balance
        assert response.account == get(accounts, member.id)
        assert response.account.balance == balance
        return reversal

    def exceeds(amount: int, refundable: int) -> None:
        found = fails(
            points.RecordRefund,
            refund_request(payment_id, amount),
            FAILED_PRECONDITION,
            "REFUND_EXCEEDS_PAYMENT",
        )
        assert found.metadata == {
            "payment": payment_id,
            "refundable": str(refundable),
            "requested": str(amount),
        }

    first = refunded(250, 250, 2, 8)  # floor(10 x 250 / 1000) = 2
    exceeds(751, refundable=750)
    second = refunded(250, 500, 3, 5)  # floor(10 x 500 / 1000) = 5: 3 more
    third = refunded(500, 1000, 5, 0)
    assert first.amount + second.amount + third.amount == earn.amount

    exceeds(1, refundable=0)
    after = get(accounts, member.id)
    assert (after.balance, after.lifetime_points) == (0, 10)
    assert [e.snapshot for e in events_of(channel, member.id) if e.type == TX_CREATED] == [
        earn,
        first,
        second,
        third,
    ]


def test_a_refund_is_exactly_once(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 1000)
    request = refund_request(paid.payment.id, 400)
    first = points.RecordRefund(request)
    assert [t.amount for t in first.points_transactions] == [4]
    assert points.RecordRefund(request) == first
    assert get(accounts, member.id).balance == 6

    for change in (
        {"amount": 401},
        {"payment_id": pay(points, program, member.customer, 1000).payment.id},
    ):
        other = points_pb2.RecordRefundRequest()
        other.CopyFrom(request)
        for name, value in change.items():
            setattr(other, name, value)
        fails(points.RecordRefund, other, INVALID, "REFUND_ID_REUSED")
    assert get(accounts, member.id).balance == 16
    assert refund(points, paid.payment.id, 600).refund.refunded_amount == 1000
    # A replay after later refunds is still the first response.
    assert points.RecordRefund(request) == first
    assert get(accounts, member.id).balance == 10


def test_concurrent_identical_refunds_reverse_once(accounts, points, programs, assert_invariants):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 10_000)
    request = refund_request(paid.payment.id, 5000)
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: points.RecordRefund(request), range(12)))
    assert all(r == responses[0] for r in responses)
    assert [t.amount for t in responses[0].points_transactions] == [50]
    assert get(accounts, member.id).balance == 50
    assert_invariants()


def test_concurrent_refunds_of_one_payment_never_reverse_more(
    accounts, points, programs, assert_invariants
):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 1000)  # 10 points

    def attempt(_: int) -> int | None:
        try:
            return points.RecordRefund(refund_request(paid.payment.id, 300)).refund.amount
        except grpc.RpcError as error:
            assert failure(error).reason == "REFUND_EXCEEDS_PAYMENT"
            return None

    with ThreadPoolExecutor(8) as pool:
        done = [r for r in pool.map(attempt, range(8)) if r is not None]
    assert len(done) == 3  # 900 of 1000
    assert get(accounts, member.id).balance == 10 - 9
    assert_invariants()


def test_a_refund_racing_a_manual_reversal_reverses_at_most_the_earn(
    accounts, points, programs, assert_invariants
):
    program = new_program(programs, per_unit("1"))
    for _ in range(5):
        member = enroll(accounts, program)
        paid = pay(points, program, member.customer, 1000)
        (earn,) = paid.points_transactions

        def attempt(i: int, earn=earn, paid=paid) -> None:
            try:
                if i % 2:
                    reverse(points, earn.id)
                else:
                    refund(points, paid.payment.id, 500)
            except grpc.RpcError as error:
                # The earn fully reversed (by hand), or the payment fully refunded.
                reason = failure(error).reason
                assert reason in ("ALREADY_REVERSED", "REFUND_EXCEEDS_PAYMENT"), reason

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(attempt, range(6)))
        after = get(accounts, member.id)
        assert (after.balance, after.lifetime_points) == (0, 10)
        reversed_total = sum(t.amount for t in ledger(points, member.id) if t.type == REVERSE)
        assert reversed_total == 10
    assert_invariants()


def test_a_refund_of_an_unknown_payment(points):
    missing = unique("pay")
    fails(points.RecordRefund, refund_request(missing, 100), NOT_FOUND, "PAYMENT_NOT_FOUND")


def test_a_refund_after_the_points_were_spent_goes_negative(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 1000)
    post(points, member.id, REDEEM, 8)
    response = refund(points, paid.payment.id, 1000)
    (reversal,) = response.points_transactions
    assert (reversal.amount, reversal.points_after) == (10, -8)
    after = get(accounts, member.id)
    assert (after.balance, after.lifetime_points) == (-8, 10)
    assert response.account == after


def test_a_refund_reverses_each_rule_separately(accounts, points, programs, assert_invariants):
    program = new_program(programs, per_unit("1"), per_unit("2"))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 999)
    base, promo = paid.points_transactions
    assert (base.amount, promo.amount) == (9, 19)

    refund_id = unique("ref")
    half = refund(points, paid.payment.id, 500, refund_id)
    # floor(9 x 500 / 999) = 4 and floor(19 x 500 / 999) = 9, not floor(28 x 500 / 999) = 14.
    first, second = half.points_transactions
    assert_reversal(first, earn=base, refund_id=refund_id, amount=4)
    assert_reversal(second, earn=promo, refund_id=refund_id, amount=9)
    assert half.account.balance == 28 - 13

    rest = refund(points, paid.payment.id, 499)
    assert [(t.reverses, t.amount) for t in rest.points_transactions] == [
        (base.id, 5),
        (promo.id, 10),
    ]
    assert rest.account.balance == 0
    assert_invariants()


def test_a_refund_counts_manual_reversals(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 1000)
    (earn,) = paid.points_transactions
    reverse(points, earn.id, amount=3)

    assert [t.amount for t in refund(points, paid.payment.id, 500).points_transactions] == [2]
    assert [t.amount for t in refund(points, paid.payment.id, 100).points_transactions] == [1]
    # floor(10 x 650 / 1000) = 6, already 6 reversed: nothing to post, still recorded.
    nothing = refund(points, paid.payment.id, 50)
    assert list(nothing.points_transactions) == []
    assert nothing.refund.refunded_amount == 650
    assert nothing.account.balance == 4
    assert [t.amount for t in refund(points, paid.payment.id, 350).points_transactions] == [4]
    assert get(accounts, member.id).balance == 0


def test_a_refund_takes_back_the_payment_rules_earns_not_the_welcome_bonus(
    accounts, points, programs
):
    """The bonus a payment's enrollment credited is for joining (origin RULE), not earned by
    the payment's rules: a full refund reverses the rules' earns only."""
    program = new_program(programs, welcome(50), per_unit("1"), auto_enroll=True)
    paid = pay(points, program, unique(), 1000)
    bonus, earn = paid.points_transactions
    assert bonus.origin.kind == Origin.KIND_RULE
    refunded = refund(points, paid.payment.id, 1000)
    assert [(t.reverses, t.amount) for t in refunded.points_transactions] == [(earn.id, 10)]
    assert refunded.account.balance == 50


def test_refund_origin_is_reserved_for_the_service(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    found = fails(
        points.CreatePointsTransaction,
        points_pb2.CreatePointsTransactionRequest(
            account=member.id,
            type=EARN,
            amount=5,
            origin=Origin(kind=Origin.KIND_REFUND, id="ref_1"),
        ),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert set(found.field_violations) == {"origin.kind"}
    assert get(accounts, member.id).balance == 0


def test_a_refund_never_demotes(accounts, points, programs):
    program = new_program(programs, per_unit("1"), tiers=(("Silver", 10),))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 1000)
    assert paid.account.tier == "Silver"
    after = refund(points, paid.payment.id, 1000).account
    assert (after.balance, after.lifetime_points, after.tier) == (0, 10, "Silver")


def test_a_refund_reverses_on_a_closed_account_even_when_it_cannot_reopen(
    accounts, points, programs, assert_invariants
):
    """The customer closed the account that earned and opened another: reopening the first
    is impossible now (one ACTIVE account per customer), and the refund must still land."""
    program = new_program(programs, per_unit("1"))
    old = enroll(accounts, program)
    paid = pay(points, program, old.customer, 1000)
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=old.id))
    new = enroll(accounts, program, old.customer)
    fails(
        accounts.ReopenAccount,
        accounts_pb2.ReopenAccountRequest(id=old.id),
        grpc.StatusCode.ALREADY_EXISTS,
        "ACCOUNT_ALREADY_EXISTS",
    )

    refunded = refund(points, paid.payment.id, 600)
    (reversal,) = refunded.points_transactions
    assert (reversal.account, reversal.amount, reversal.points_after) == (old.id, 6, 4)
    assert (refunded.account.id, refunded.account.status, refunded.account.balance) == (
        old.id,
        CLOSED,
        4,
    )
    assert get(accounts, new.id).balance == 0
    # A manual reversal still needs an ACTIVE account.
    fails(
        points.ReversePointsTransaction,
        points_pb2.ReversePointsTransactionRequest(id=paid.points_transactions[0].id),
        FAILED_PRECONDITION,
        "ACCOUNT_NOT_ACTIVE",
    )
    assert_invariants()


def test_a_refund_after_a_merge_reverses_on_the_surviving_account(
    accounts, points, programs, assert_invariants
):
    program = new_program(programs, per_unit("1"))
    source = enroll(accounts, program)
    target = enroll(accounts, program)
    paid = pay(points, program, source.customer, 1000)
    (earn,) = paid.points_transactions
    accounts.MergeAccounts(accounts_pb2.MergeAccountsRequest(source=source.id, target=target.id))
    response = refund(points, paid.payment.id, 1000)
    (reversal,) = response.points_transactions
    assert (reversal.account, reversal.reverses, reversal.amount) == (target.id, earn.id, 10)
    assert response.account.id == target.id
    assert response.account.balance == 0
    assert_invariants()


# -- under load -------------------------------------------------------------------------


def test_many_payments_and_refunds_at_once(accounts, points, programs, assert_invariants):
    """8 threads x 25 payments over 20 customers of an auto-enroll program, every fifth
    refunded by half, every seventh sent twice: exact balances after."""
    bonus = 7
    program = new_program(programs, welcome(bonus), per_unit("1"), auto_enroll=True)
    customers = [unique() for _ in range(20)]
    prefix = unique("hammer")

    def plan(thread: int, n: int) -> tuple[str, str, int]:
        amount = 100 * ((thread * 3 + n) % 9 + 1) + 37
        return f"{prefix}-{thread}-{n}", customers[(thread * 25 + n) % 20], amount

    def work(thread: int) -> None:
        for n in range(25):
            payment_id, customer, amount = plan(thread, n)
            request = payment(program, customer, amount, payment_id=payment_id)
            response = points.RecordPayment(request)
            assert response.payment.outcome == EARNED
            if n % 7 == 0:
                assert points.RecordPayment(request) == response
            if n % 5 == 0:
                refund(points, payment_id, amount // 2)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))

    expected = dict.fromkeys(customers, bonus)
    for thread in range(8):
        for n in range(25):
            _, customer, amount = plan(thread, n)
            earned = amount // 100
            expected[customer] += earned
            if n % 5 == 0:
                expected[customer] -= earned * (amount // 2) // amount
    listed = accounts_of(accounts, program.id)
    assert sorted(a.customer for a in listed) == sorted(customers)
    assert {a.customer: a.balance for a in listed} == expected
    assert_invariants()


# -- grpcurl ----------------------------------------------------------------------------


def test_grpcurl_record_payment(service, programs):
    program = new_program(programs, welcome(5), per_unit("1"), auto_enroll=True)
    customer = unique()
    body = json.dumps(
        {
            "payment_id": unique("pay"),
            "program": program.id,
            "customer": customer,
            "amount": "1999",
            "currency": "EUR",
            "occurred_at": "2026-03-01T12:00:00Z",
            "metadata": {"store": "7"},
        }
    )
    response = json.loads(
        grpcurl(service.address, "-d", body, "vinr.loyalty.v1.PointsLedger/RecordPayment")
    )
    assert response["payment"]["outcome"] == "OUTCOME_EARNED"
    assert response["payment"]["enrolled"] is True
    assert [t["amount"] for t in response["points_transactions"]] == ["5", "19"]
    assert response["points_transactions"][1]["origin"]["kind"] == "KIND_PAYMENT"
    assert response["account"]["balance"] == "24"
    assert response["account"]["customer"] == customer


def test_the_readme_walkthrough_with_grpcurl(service):
    """The README's grpcurl commands for a program with rules, a payment and a refund, run
    as written (with ids of their own), give the figures the README states."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(
        r"grpcurl -plaintext -d '(.*?)' \\\n\s+localhost:50051 (\S+)", readme, re.S
    )
    wanted = ["LoyaltyPrograms/CreateProgram", "LoyaltyPrograms/UpdateProgram"]
    wanted += ["PointsLedger/RecordPayment", "PointsLedger/RecordRefund"]
    steps = [(body, method) for body, method in commands if method.split(".")[-1] in wanted]
    assert [method.split(".")[-1] for _, method in steps] == wanted
    names = {
        "prog_coffee": unique("prog_coffee"),
        "create-prog_coffee": unique("create"),
        "rules-1": unique("rules"),
        "pay_9001": unique("pay"),
        "cust_new": unique(),
        "ref_1": unique("ref"),
    }
    responses = []
    for body, method in steps:
        for name, fresh in names.items():
            body = body.replace(f'"{name}"', f'"{fresh}"')
        responses.append(json.loads(grpcurl(service.address, "-d", body, method)))
    _, updated, paid, refunded = responses
    assert updated["auto_enroll"] is True and len(updated["earning_rules"]) == 2
    assert (paid["payment"]["outcome"], paid["payment"]["enrolled"]) == ("OUTCOME_EARNED", True)
    assert [t["amount"] for t in paid["points_transactions"]] == ["100", "42"]
    assert paid["account"]["balance"] == "142"
    assert [t["amount"] for t in refunded["points_transactions"]] == ["21"]
    assert refunded["account"]["balance"] == "121"


# -- merges, races with programs and merges, limits ----------------------------------------


def test_a_merged_customer_earns_on_the_survivor_and_is_not_welcomed_again(
    accounts, points, programs, assert_invariants
):
    program = new_program(programs, welcome(50), per_unit("1"), auto_enroll=True)
    first, second = unique(), unique()
    duplicate = pay(points, program, first, 1000).account  # enrolled: 50 + 10
    survivor = pay(points, program, second, 2000).account  # enrolled: 50 + 20
    accounts.MergeAccounts(
        accounts_pb2.MergeAccountsRequest(source=duplicate.id, target=survivor.id)
    )

    again = pay(points, program, first, 500)
    assert (again.payment.outcome, again.payment.enrolled) == (EARNED, False)
    assert (again.payment.account, again.account.id) == (survivor.id, survivor.id)
    assert [t.amount for t in again.points_transactions] == [5]
    assert again.account.balance == 60 + 70 + 5
    assert accounts_of(accounts, program.id, first) == [get(accounts, duplicate.id)]

    # A survivor that is closed closes the door for both customers.
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=survivor.id))
    for customer in (first, second):
        closed = pay(points, program, customer, 500)
        assert (closed.payment.outcome, closed.HasField("account")) == (ACCOUNT_CLOSED, False)
    assert get(accounts, survivor.id).balance == 135
    assert_invariants()


def test_refunds_racing_a_merge_all_land_with_exact_balances(
    accounts, points, programs, assert_invariants
):
    program = new_program(programs, per_unit("1"))
    for _ in range(4):
        source, target = enroll(accounts, program), enroll(accounts, program)
        payments = [pay(points, program, source.customer, 1000) for _ in range(4)]

        def act(i: int, source=source, target=target, payments=payments) -> object:
            if i == 0:
                return accounts.MergeAccounts(
                    accounts_pb2.MergeAccountsRequest(source=source.id, target=target.id)
                )
            return refund(points, payments[i - 1].payment.id, 500)

        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(act, range(5)))
        refunds = results[1:]
        assert all(len(r.points_transactions) == 1 for r in refunds)
        assert all(r.points_transactions[0].amount == 5 for r in refunds)
        # Each reversal is on the account that held its earn when it ran.
        assert {r.account.id for r in refunds} <= {source.id, target.id}
        assert get(accounts, target.id).balance == 40 - 20
        assert get(accounts, source.id).balance == 0
    assert_invariants()


def test_payments_racing_rule_and_program_changes_earn_by_a_live_version(
    accounts, points, programs, assert_invariants
):
    program = new_program(programs, per_unit("1"), auto_enroll=True)
    (rule,) = program.earning_rules
    rates = {1: 1}

    def change_rates() -> None:
        for version in range(2, 8):
            changed = RULE()
            changed.CopyFrom(rule)
            changed.points_per_unit = str(version)
            updated = set_rules(programs, program.id, changed)
            assert updated.earning_rules[0].version == version
            rates[version] = version

    def pay_many(worker: int) -> list[points_pb2.RecordPaymentResponse]:
        return [pay(points, program, f"{program.id}-{worker}-{n % 3}", 1000) for n in range(15)]

    with ThreadPoolExecutor(5) as pool:
        changer = pool.submit(change_rates)
        paid = [r for batch in pool.map(pay_many, range(4)) for r in batch]
        changer.result()

    for response in paid:
        (earn,) = response.points_transactions[-1:]
        assert earn.rule == rule.id
        assert earn.amount == 10 * rates[earn.rule_version], (earn.amount, earn.rule_version)
    balances = {a.customer: a.balance for a in accounts_of(accounts, program.id)}
    assert len(balances) == 12
    assert sum(balances.values()) == sum(r.points_transactions[-1].amount for r in paid)
    assert_invariants()


def test_an_enrolling_payment_crossing_two_tiers(channel, accounts, points, programs):
    program = new_program(
        programs,
        welcome(100),
        per_unit("1"),
        auto_enroll=True,
        tiers=(("Silver", 100), ("Gold", 150)),
    )
    response = pay(points, program, unique(), 6000)
    account = response.account
    assert (account.tier, account.balance, account.version) == ("Gold", 160, 3)
    bonus, earn = response.points_transactions
    listed = events_of(channel, account.id)
    assert [e.type for e in listed] == [
        ACCOUNT_CREATED,
        TX_CREATED,
        TIER_CHANGED,
        TX_CREATED,
        TIER_CHANGED,
    ]
    assert [(e.snapshot.tier, e.snapshot.version) for e in (listed[0], listed[2], listed[4])] == [
        ("", 1),
        ("Silver", 2),
        ("Gold", 3),
    ]
    assert [listed[1].snapshot, listed[3].snapshot] == [bonus, earn]


def test_a_balance_limit_records_nothing(accounts, points, programs, database_url):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    # Only a direct write reaches the limit in a test's time: 10^18 points.
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("UPDATE accounts SET balance = %s WHERE id = %s", [10**18 - 5, member.id])
    request = payment(program, member.customer, 1000)
    found = fails(points.RecordPayment, request, FAILED_PRECONDITION, "BALANCE_LIMIT_EXCEEDED")
    assert found.metadata["balance"] == str(10**18 - 5)
    fails(
        points.RecordRefund, refund_request(request.payment_id, 1), NOT_FOUND, "PAYMENT_NOT_FOUND"
    )
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("UPDATE accounts SET balance = 0 WHERE id = %s", [member.id])
    assert points.RecordPayment(request).account.balance == 10


def test_a_closed_account_without_auto_enroll(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=member.id))
    response = pay(points, program, member.customer, 1000)
    assert (response.payment.outcome, response.HasField("account")) == (ACCOUNT_CLOSED, False)


def test_a_reused_refund_id_is_named_as_such(accounts, points, programs):
    program = new_program(programs, per_unit("1"))
    member = enroll(accounts, program)
    paid = pay(points, program, member.customer, 1000)
    first = refund(points, paid.payment.id, 100)
    for request in (
        refund_request(paid.payment.id, 200, first.refund.id),
        refund_request(unique("pay"), 100, first.refund.id),  # a payment never recorded
    ):
        found = fails(points.RecordRefund, request, INVALID, "REFUND_ID_REUSED")
        assert found.metadata == {"refund": first.refund.id}


def test_an_unchanged_rule_keeps_its_spelling(programs):
    program = new_program(programs, per_unit("1.5"))
    (rule,) = program.earning_rules
    respelled = RULE()
    respelled.CopyFrom(rule)
    respelled.points_per_unit = "1.5000"
    (kept,) = set_rules(programs, program.id, respelled).earning_rules
    assert kept == rule
    read = programs.GetEarningRule(programs_pb2.GetEarningRuleRequest(id=rule.id))
    assert read == rule
