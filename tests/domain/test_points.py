"""Points transactions: what a posting does to an account's totals, the bounds its balance
must stay within, how much of a transaction may still be reversed, and the ledger rows."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty_service import domain
from tests.domain.builders import (
    ACCOUNT,
    ACCOUNT_ID,
    ADJUST,
    CLOSED,
    CREDIT,
    DEBIT,
    EARN,
    EXPIRE,
    MERGED,
    NOW,
    OTHER_ACCOUNT_ID,
    PROPERTY,
    REDEEM,
    REVERSE,
    TRANSACTION_ID,
    account,
    transaction,
)

LATER = NOW.replace(hour=1)
LIMIT = domain.ids.MAX_BALANCE


def test_the_limits():
    assert domain.ids.MAX_AMOUNT == 1_000_000_000
    assert domain.ids.MAX_BALANCE == 10**15
    assert domain.points.NO_FLOOR == -(10**15)
    assert set(domain.points.LIFETIME_TYPES) == {EARN, ADJUST}
    assert domain.points.IMPLIED_DIRECTION == {EARN: CREDIT, REDEEM: DEBIT, EXPIRE: DEBIT}


@pytest.mark.parametrize(
    ("type_", "direction", "amount", "may_overdraw", "expected"),
    [
        (EARN, CREDIT, 10, False, domain.points.Change(10, 10, domain.points.NO_FLOOR)),
        (ADJUST, CREDIT, 10, False, domain.points.Change(10, 10, domain.points.NO_FLOOR)),
        # A reversal of a debit gives points back: they were never earned anew.
        (REVERSE, CREDIT, 10, False, domain.points.Change(10, 0, domain.points.NO_FLOOR)),
        # Credits never overdraw, whatever the flag says.
        (EARN, CREDIT, 10, True, domain.points.Change(10, 10, domain.points.NO_FLOOR)),
        (REDEEM, DEBIT, 7, False, domain.points.Change(-7, 0, 0)),
        (ADJUST, DEBIT, 7, False, domain.points.Change(-7, 0, 0)),
        (EXPIRE, DEBIT, 7, False, domain.points.Change(-7, 0, 0)),
        (REVERSE, DEBIT, 7, False, domain.points.Change(-7, 0, 0)),
        (REVERSE, DEBIT, 7, True, domain.points.Change(-7, 0, domain.points.NO_FLOOR)),
        (REVERSE, DEBIT, domain.ids.MAX_AMOUNT, True, domain.points.Change(-(10**9), 0, -(10**15))),
    ],
)
def test_change(type_, direction, amount, may_overdraw, expected):
    found = domain.points.change(type_, direction, amount, may_overdraw=may_overdraw)
    assert found == expected
    assert found.max_balance == LIMIT


@pytest.mark.parametrize(
    ("type_", "direction", "amount", "balance", "lifetime"),
    [
        (EARN, CREDIT, 10, 110, 160),
        (ADJUST, CREDIT, 10, 110, 160),
        (REVERSE, CREDIT, 10, 110, 150),
        (REDEEM, DEBIT, 100, 0, 150),
        (ADJUST, DEBIT, 30, 70, 150),
        (EXPIRE, DEBIT, 1, 99, 150),
    ],
)
def test_post_moves_balance_and_lifetime(type_, direction, amount, balance, lifetime):
    change = domain.points.change(type_, direction, amount)
    after = ACCOUNT.balance + change.delta
    assert (after, ACCOUNT.lifetime_points + change.lifetime_delta) == (balance, lifetime)
    assert change.min_balance <= after <= change.max_balance


def test_debits_may_not_overdraw_except_reversals():
    redeem = domain.points.change(REDEEM, DEBIT, 101)
    assert ACCOUNT.balance + redeem.delta < redeem.min_balance == 0
    refused = domain.points.refusal("INSUFFICIENT_POINTS", ACCOUNT_ID, ACCOUNT, redeem)
    assert isinstance(refused, domain.errors.InsufficientPoints)
    assert refused.metadata == {
        "available": "100",
        "held": "0",
        "balance": "100",
        "requested": "101",
    }
    change = domain.points.change(REVERSE, DEBIT, 130, may_overdraw=True)
    assert change == domain.points.Change(
        delta=-130, lifetime_delta=0, min_balance=domain.points.NO_FLOOR
    )
    assert ACCOUNT.balance + change.delta == -30 >= change.min_balance


def test_balance_limit():
    rich = replace(ACCOUNT, balance=domain.ids.MAX_BALANCE)
    earn = domain.points.change(EARN, CREDIT, 1)
    assert rich.balance + earn.delta > earn.max_balance
    refused = domain.points.refusal("BALANCE_LIMIT_EXCEEDED", ACCOUNT_ID, rich, earn)
    assert isinstance(refused, domain.errors.BalanceLimitExceeded)


@pytest.mark.parametrize("status", [CLOSED, MERGED])
def test_inactive_accounts_take_nothing(status):
    inactive = replace(ACCOUNT, status=status)
    with pytest.raises(domain.errors.AccountNotActive) as caught:
        domain.accounts.require_active(inactive)
    assert caught.value.reason == "ACCOUNT_NOT_ACTIVE"
    assert caught.value.metadata == {"account": ACCOUNT_ID, "status": status.value}
    assert caught.value.message == f"account {ACCOUNT_ID} is {status.value}, not ACTIVE"
    refused = domain.points.refusal(
        "ACCOUNT_NOT_ACTIVE", ACCOUNT_ID, inactive, domain.points.change(EARN, CREDIT, 1)
    )
    assert isinstance(refused, domain.errors.AccountNotActive)
    assert (refused.metadata, refused.message) == (caught.value.metadata, caught.value.message)


def test_an_active_account_is_active():
    assert domain.accounts.require_active(ACCOUNT) is None


@pytest.mark.parametrize(
    ("reason", "before", "change", "error", "metadata", "message"),
    [
        (
            "INSUFFICIENT_POINTS",
            account(balance=100),
            domain.points.change(REDEEM, DEBIT, 101),
            domain.errors.InsufficientPoints,
            {"available": "100", "held": "0", "balance": "100", "requested": "101"},
            "100 points are available (100 less 0 held), fewer than the 101 requested",
        ),
        (
            "INSUFFICIENT_POINTS",
            account(balance=-LIMIT),
            domain.points.change(REVERSE, DEBIT, 1, may_overdraw=True),
            domain.errors.InsufficientPoints,
            {"available": str(-LIMIT), "held": "0", "balance": str(-LIMIT), "requested": "1"},
            f"{-LIMIT} points are available ({-LIMIT} less 0 held), fewer than the 1 requested",
        ),
        (
            "BALANCE_LIMIT_EXCEEDED",
            account(balance=LIMIT - 1),
            domain.points.change(EARN, CREDIT, 2),
            domain.errors.BalanceLimitExceeded,
            {"balance": str(LIMIT - 1), "requested": "2", "limit": str(LIMIT)},
            f"balance {LIMIT - 1} plus 2 exceeds {LIMIT}",
        ),
        (
            "BALANCE_LIMIT_EXCEEDED",
            account(balance=100),
            domain.points.Change(5, 0, domain.points.NO_FLOOR, max_balance=104),
            domain.errors.BalanceLimitExceeded,
            {"balance": "100", "requested": "5", "limit": "104"},
            "balance 100 plus 5 exceeds 104",
        ),
        (
            "ACCOUNT_NOT_ACTIVE",
            account(status=CLOSED),
            domain.points.change(EARN, CREDIT, 1),
            domain.errors.AccountNotActive,
            {"account": ACCOUNT_ID, "status": "CLOSED"},
            f"account {ACCOUNT_ID} is CLOSED, not ACTIVE",
        ),
        (
            "ACCOUNT_NOT_FOUND",
            account(),
            domain.points.change(EARN, CREDIT, 1),
            domain.errors.AccountNotFound,
            {"account": ACCOUNT_ID},
            f"account {ACCOUNT_ID} does not exist",
        ),
        # No account found: whatever the reason, it does not exist.
        (
            "INSUFFICIENT_POINTS",
            None,
            domain.points.change(REDEEM, DEBIT, 1),
            domain.errors.AccountNotFound,
            {"account": ACCOUNT_ID},
            f"account {ACCOUNT_ID} does not exist",
        ),
    ],
)
def test_refusal(reason, before, change, error, metadata, message):
    refused = domain.points.refusal(reason, ACCOUNT_ID, before, change)
    assert type(refused) is error
    assert (refused.metadata, refused.message) == (metadata, message)


def test_a_refusal_for_a_reason_no_error_has_is_a_bug():
    with pytest.raises(AssertionError, match="unknown reason: NOPE"):
        domain.points.refusal("NOPE", ACCOUNT_ID, ACCOUNT, domain.points.change(EARN, CREDIT, 1))


@pytest.mark.parametrize(
    ("amount", "reversed_", "expected"), [(50, 0, 50), (50, 20, 30), (50, 50, 0), (1, 0, 1)]
)
def test_reversible_amount(amount, reversed_, expected):
    assert domain.points.reversible_amount(transaction(EARN, CREDIT, amount, reversed_)) == expected


@pytest.mark.parametrize(
    ("original", "requested", "expected"),
    [
        (transaction(EARN, CREDIT, 50, 20), None, 30),
        (transaction(EARN, CREDIT, 50, 20), 30, 30),
        (transaction(EARN, CREDIT, 50, 20), 1, 1),
        (transaction(EARN, CREDIT, 50, 0), None, 50),
        (transaction(REDEEM, DEBIT, 40, 0), None, 40),
        (transaction(ADJUST, DEBIT, 40, 39), None, 1),
        (transaction(EXPIRE, DEBIT, 40, 0), 40, 40),
    ],
)
def test_reversal_amounts(original, requested, expected):
    assert domain.points.check_reversal(original, requested) == expected


@pytest.mark.parametrize(
    ("original", "requested", "metadata", "message"),
    [
        (
            transaction(EARN, CREDIT, 50, 20),
            31,
            {"reversible": "30", "requested": "31"},
            f"{TRANSACTION_ID} has 30 of 50 points left to reverse; 31 requested",
        ),
        (
            transaction(EARN, CREDIT, 50, 50),
            None,
            {"reversible": "0", "requested": "0"},
            f"{TRANSACTION_ID} has 0 of 50 points left to reverse; 0 requested",
        ),
        (
            transaction(REDEEM, DEBIT, 40, 40),
            1,
            {"reversible": "0", "requested": "1"},
            f"{TRANSACTION_ID} has 0 of 40 points left to reverse; 1 requested",
        ),
    ],
)
def test_already_reversed(original, requested, metadata, message):
    with pytest.raises(domain.errors.AlreadyReversed) as caught:
        domain.points.check_reversal(original, requested)
    assert caught.value.reason == "ALREADY_REVERSED"
    assert caught.value.metadata == {"points_transaction": TRANSACTION_ID, **metadata}
    assert caught.value.message == message


@pytest.mark.parametrize("requested", [None, 1])
def test_a_reversal_is_not_reversible(requested):
    with pytest.raises(domain.errors.NotReversible) as caught:
        domain.points.check_reversal(transaction(REVERSE, DEBIT, 5), requested)
    assert caught.value.reason == "NOT_REVERSIBLE"
    assert caught.value.metadata == {"points_transaction": TRANSACTION_ID}
    assert caught.value.message == f"{TRANSACTION_ID} is itself a reversal"


@given(amount=st.integers(1, domain.ids.MAX_AMOUNT), data=st.data())
@PROPERTY
def test_reversals_by_hand_never_take_back_more_than_the_transaction(amount, data):
    """However a transaction is reversed by hand, in parts and then the rest, the parts add
    up to at most its amount, the rest (no amount given) is exactly what is left, and after
    that nothing more may be reversed."""
    original = transaction(EARN, CREDIT, amount)
    while data.draw(st.booleans()):
        left = domain.points.reversible_amount(original)
        requested = data.draw(st.integers(1, left + 2))
        if requested > left:
            with pytest.raises(domain.errors.AlreadyReversed):
                domain.points.check_reversal(original, requested)
            continue
        assert domain.points.check_reversal(original, requested) == requested
        original = replace(original, reversed_amount=original.reversed_amount + requested)
        if original.reversed_amount == amount:
            break
    if original.reversed_amount < amount:
        rest = domain.points.check_reversal(original, None)
        assert rest == amount - original.reversed_amount
        original = replace(original, reversed_amount=amount)
    assert domain.points.reversible_amount(original) == 0
    with pytest.raises(domain.errors.AlreadyReversed):
        domain.points.check_reversal(original, None)


def test_as_posted_undoes_what_merges_and_reversals_changed():
    plain = transaction(EARN, CREDIT, 50)
    assert domain.points.as_posted(plain) is plain
    reversed_ = replace(plain, reversed_amount=20)
    assert domain.points.as_posted(reversed_) == plain
    moved = replace(plain, account=OTHER_ACCOUNT_ID, original_account=ACCOUNT_ID)
    assert domain.points.as_posted(moved) == plain
    both = replace(moved, reversed_amount=50)
    assert domain.points.as_posted(both) == plain
    assert domain.points.as_posted(both).account == ACCOUNT_ID


def test_to_post():
    new = domain.points.NewTransaction(
        account=ACCOUNT_ID,
        type=ADJUST,
        direction=DEBIT,
        amount=7,
        reason="goodwill",
        origin_kind=domain.points.OriginKind.MANUAL,
        origin_id="case-1",
        metadata={"k": "v"},
    )
    row = domain.points.to_post(new, NOW)
    assert domain.ids.TRANSACTION_ID.fullmatch(row.id), row.id
    assert row == transaction(
        ADJUST, DEBIT, 7, id=row.id, reason="goodwill", origin_id="case-1", metadata={"k": "v"}
    )
    assert (row.reverses, row.original_account, row.reversed_amount) == (None, None, 0)
    assert (row.rule, row.rule_version) == (None, None)
    assert domain.points.to_post(new, NOW).id != row.id


def test_new_transaction_defaults():
    new = domain.points.NewTransaction(account=ACCOUNT_ID, type=EARN, direction=CREDIT, amount=1)
    assert (new.reason, new.origin_kind, new.origin_id, new.metadata) == (
        "",
        domain.points.OriginKind.MANUAL,
        "",
        {},
    )


def test_revised_moves_the_version_and_the_update_time_on():
    after = domain.accounts.revised(ACCOUNT, LATER, "crm", balance=5)
    assert after == replace(ACCOUNT, balance=5, update_time=LATER, version=2, actor="crm")
    again = domain.accounts.revised(after, LATER, "spiffe://a/checkout")
    assert (again.version, again.actor) == (3, "spiffe://a/checkout")


def test_merge_rules():
    other = replace(ACCOUNT, id=OTHER_ACCOUNT_ID, balance=5, lifetime_points=7)
    domain.accounts.check_merge(ACCOUNT, other)
    assert domain.accounts.merged_target(other, ACCOUNT, NOW, "crm", []).balance == 105
    assert domain.accounts.merged_target(other, ACCOUNT, NOW, "crm", []).lifetime_points == 157
    with pytest.raises(domain.errors.ProgramMismatch) as mismatch:
        domain.accounts.check_merge(ACCOUNT, replace(other, program="prog_other"))
    assert mismatch.value.metadata == {
        "source": ACCOUNT_ID,
        "target": OTHER_ACCOUNT_ID,
        "sourceProgram": "prog_default",
        "targetProgram": "prog_other",
    }
    with pytest.raises(domain.errors.AccountNotActive):
        domain.accounts.check_merge(ACCOUNT, replace(other, status=CLOSED))
    with pytest.raises(domain.errors.AccountNotActive):
        domain.accounts.check_merge(replace(ACCOUNT, status=MERGED), other)


def test_merged_accounts():
    source = account(balance=-8, lifetime_points=40, tier="gold")
    target = account(id=OTHER_ACCOUNT_ID, balance=30, lifetime_points=60, version=4)
    merged = domain.accounts.merged_target(target, source, LATER, "crm", [])
    assert merged == replace(
        target, balance=22, lifetime_points=100, update_time=LATER, version=5, actor="crm"
    )
    emptied = domain.accounts.merged_source(source, target, LATER, "crm")
    assert emptied == replace(
        source,
        status=MERGED,
        merged_into=OTHER_ACCOUNT_ID,
        balance=0,
        lifetime_points=0,
        update_time=LATER,
        version=2,
        actor="crm",
    )


@pytest.mark.parametrize(
    ("prefix", "pattern"),
    [
        ("loy_", domain.ids.ACCOUNT_ID),
        ("ptx_", domain.ids.TRANSACTION_ID),
        ("rule_", domain.ids.RULE_ID),
    ],
)
def test_new_ids(prefix, pattern):
    ids = {domain.ids.new_id(prefix) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(pattern.fullmatch(i) for i in ids)
    assert {len(i) for i in ids} == {len(prefix) + 20}


@pytest.mark.parametrize(
    ("error", "reason", "kind"),
    [
        (domain.errors.LedgerError, "LEDGER_ERROR", Exception),
        (domain.errors.InvalidArgument, "INVALID_ARGUMENT", domain.errors.LedgerError),
        (domain.errors.RequestIdReused, "REQUEST_ID_REUSED", domain.errors.LedgerError),
        (domain.errors.PaymentIdReused, "PAYMENT_ID_REUSED", domain.errors.RequestIdReused),
        (domain.errors.RefundIdReused, "REFUND_ID_REUSED", domain.errors.RequestIdReused),
        (domain.errors.ProgramNotFound, "PROGRAM_NOT_FOUND", domain.errors.NotFound),
        (domain.errors.AccountNotFound, "ACCOUNT_NOT_FOUND", domain.errors.NotFound),
        (domain.errors.TransactionNotFound, "POINTS_TRANSACTION_NOT_FOUND", domain.errors.NotFound),
        (domain.errors.EarningRuleNotFound, "EARNING_RULE_NOT_FOUND", domain.errors.NotFound),
        (domain.errors.PaymentNotFound, "PAYMENT_NOT_FOUND", domain.errors.NotFound),
        (domain.errors.AccountAlreadyExists, "ACCOUNT_ALREADY_EXISTS", domain.errors.LedgerError),
        (domain.errors.ProgramAlreadyExists, "PROGRAM_ALREADY_EXISTS", domain.errors.LedgerError),
        (domain.errors.AccountNotActive, "ACCOUNT_NOT_ACTIVE", domain.errors.FailedPrecondition),
        (domain.errors.AccountNotClosed, "ACCOUNT_NOT_CLOSED", domain.errors.FailedPrecondition),
        (domain.errors.InsufficientPoints, "INSUFFICIENT_POINTS", domain.errors.FailedPrecondition),
        (
            domain.errors.BalanceLimitExceeded,
            "BALANCE_LIMIT_EXCEEDED",
            domain.errors.FailedPrecondition,
        ),
        (domain.errors.AlreadyReversed, "ALREADY_REVERSED", domain.errors.FailedPrecondition),
        (domain.errors.NotReversible, "NOT_REVERSIBLE", domain.errors.FailedPrecondition),
        (domain.errors.ProgramMismatch, "PROGRAM_MISMATCH", domain.errors.FailedPrecondition),
        (domain.errors.ProgramNotActive, "PROGRAM_NOT_ACTIVE", domain.errors.FailedPrecondition),
        (domain.errors.CurrencyLocked, "CURRENCY_LOCKED", domain.errors.FailedPrecondition),
        (domain.errors.CurrencyMismatch, "CURRENCY_MISMATCH", domain.errors.FailedPrecondition),
        (
            domain.errors.PointsLimitExceeded,
            "POINTS_LIMIT_EXCEEDED",
            domain.errors.FailedPrecondition,
        ),
        (
            domain.errors.RefundExceedsPayment,
            "REFUND_EXCEEDS_PAYMENT",
            domain.errors.FailedPrecondition,
        ),
        (domain.errors.EventPositionExpired, "EVENT_POSITION_EXPIRED", domain.errors.OutOfRange),
        (domain.errors.EventPositionAhead, "EVENT_POSITION_AHEAD", domain.errors.OutOfRange),
        (domain.errors.SubscriberTooSlow, "SUBSCRIBER_TOO_SLOW", domain.errors.LedgerError),
        (domain.errors.ServerStopping, "SERVER_STOPPING", domain.errors.LedgerError),
    ],
)
def test_error_reasons(error, reason, kind):
    """The reasons are the contract clients match on: they never change."""
    assert error.reason == reason
    assert issubclass(error, kind)


def test_error_metadata_is_text():
    error = domain.errors.LedgerError("seven", count=7, status=CLOSED, missing=None)
    assert (error.message, str(error)) == ("seven", "seven")
    assert error.metadata == {"count": "7", "status": "CLOSED", "missing": "None"}
