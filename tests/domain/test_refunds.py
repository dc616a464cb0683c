"""Refunds: how much of a payment is left to refund, the points each refund reverses of the
payment's earns (in proportion, cumulatively, counting reversals by hand), and the
reversals' ledger rows and bounds."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty_service import domain
from tests.domain.builders import (
    ACCOUNT_ID,
    CREDIT,
    DEBIT,
    NOW,
    OTHER_ACCOUNT_ID,
    PAYMENT_ID,
    REDEEM,
    REVERSE,
    THOROUGH,
    earn,
    transaction,
)

REFUND = (domain.points.OriginKind.REFUND, "ref_1")


@pytest.mark.parametrize(
    ("earned", "payment_amount", "refunded_after", "expected"),
    [
        # One earn of 10 for 1000, refunded 250, then 250, then 500.
        ([(10, 0)], 1000, 250, [(0, 2)]),  # floor(10 x 250 / 1000) = 2
        ([(10, 2)], 1000, 500, [(0, 3)]),  # floor(10 x 500 / 1000) = 5: 3 more
        ([(10, 5)], 1000, 1000, [(0, 5)]),
        # 400, then the other 600.
        ([(10, 0)], 1000, 400, [(0, 4)]),
        ([(10, 4)], 1000, 1000, [(0, 6)]),
        ([(10, 0)], 1000, 600, [(0, 6)]),
        ([(10, 0)], 1000, 1000, [(0, 10)]),
        ([(10, 0)], 1000, 500, [(0, 5)]),
        # Three refunds of 300.
        ([(10, 0)], 1000, 300, [(0, 3)]),
        ([(10, 3)], 1000, 600, [(0, 3)]),
        ([(10, 6)], 1000, 900, [(0, 3)]),
        ([(100, 0)], 10_000, 5000, [(0, 50)]),
        ([(42, 0)], 4250, 2125, [(0, 21)]),
        ([(5, 0)], 537, 268, [(0, 2)]),  # floor(5 x 268 / 537) = floor(2.49)
        # Each earn in proportion on its own: 4 and 9, not floor(28 x 500 / 999) = 13 ...
        ([(9, 0), (19, 0)], 999, 500, [(0, 4), (1, 9)]),
        # ... and the rest of each with the rest of the payment.
        ([(9, 4), (19, 9)], 999, 999, [(0, 5), (1, 10)]),
        # Reversals by hand count as reversed already: 3 reversed, then refunds.
        ([(10, 3)], 1000, 500, [(0, 2)]),
        ([(10, 5)], 1000, 600, [(0, 1)]),
        ([(10, 6)], 1000, 650, []),  # floor(10 x 650 / 1000) = 6, 6 reversed: nothing
        ([(10, 6)], 1000, 1000, [(0, 4)]),
        ([(10, 7)], 1000, 500, []),  # more than its share reversed: nothing, never less
        ([(10, 10)], 1000, 1000, []),
        ([(9, 9), (19, 0)], 999, 999, [(1, 19)]),
        # Rounding to nothing, until the full refund.
        ([(1, 0)], 1000, 500, []),
        ([(1, 0)], 1000, 999, []),
        ([(1, 0)], 1000, 1000, [(0, 1)]),
        # Exact integers at the limits: no float would tell 999,999,999 from 10^9 here.
        ([(10**9, 0)], 10**15, 1, []),
        ([(10**9, 0)], 10**15, 10**6, [(0, 1)]),
        ([(10**9, 0)], 10**15, 10**15 - 1, [(0, 999_999_999)]),
        ([(10**9, 0)], 10**15, 10**15, [(0, 10**9)]),
        ([], 1000, 1000, []),
    ],
)
def test_refund_reversals(earned, payment_amount, refunded_after, expected):
    earns = [earn(amount, reversed_, number=i) for i, (amount, reversed_) in enumerate(earned)]
    due = domain.payments.refund_reversals(earns, payment_amount, refunded_after)
    assert due == [(earns[i], points) for i, points in expected]
    assert all(row is earns[i] for (row, _), (i, _) in zip(due, expected, strict=True))


@pytest.mark.parametrize(
    ("amount", "refunded", "requested"),
    [(1000, 0, 1000), (1000, 0, 1), (1000, 250, 750), (1000, 999, 1), (1, 0, 1)],
)
def test_a_refund_within_the_payment(amount, refunded, requested):
    assert domain.payments.check_refund(PAYMENT_ID, amount, refunded, requested) is None


@pytest.mark.parametrize(
    ("amount", "refunded", "requested", "refundable"),
    [
        (1000, 250, 751, 750),
        (1000, 1000, 1, 0),
        (999, 0, 1000, 999),
        (10**15, 0, 10**15 + 1, 10**15),
    ],
)
def test_a_refund_beyond_the_payment(amount, refunded, requested, refundable):
    with pytest.raises(domain.errors.RefundExceedsPayment) as caught:
        domain.payments.check_refund(PAYMENT_ID, amount, refunded, requested)
    assert caught.value.reason == "REFUND_EXCEEDS_PAYMENT"
    assert caught.value.metadata == {
        "payment": PAYMENT_ID,
        "refundable": str(refundable),
        "requested": str(requested),
    }
    assert caught.value.message == (
        f"payment {PAYMENT_ID} of {amount} has {refundable} left to refund; {requested} requested"
    )


@pytest.mark.parametrize("refund", [True, False])
def test_a_reversal_of_an_earn(refund):
    original = earn(10)
    row, change = domain.points.reversal(
        original, 6, REFUND, "refund of payment pay_1", NOW, refund=refund
    )
    assert domain.ids.TRANSACTION_ID.fullmatch(row.id) and row.id != original.id
    assert row == transaction(  # with points_after 0: the posting fills it in
        REVERSE,
        DEBIT,
        6,
        id=row.id,
        reason="refund of payment pay_1",
        origin_kind=domain.points.OriginKind.REFUND,
        origin_id="ref_1",
        reverses=original.id,
    )
    # May overdraw (points given back are taken back even if spent), never counts towards
    # lifetime points; a CLOSED account takes it only for a refund.
    assert change == domain.points.Change(
        delta=-6, lifetime_delta=0, min_balance=domain.points.NO_FLOOR, closed_ok=refund
    )
    assert change.max_balance == domain.ids.MAX_BALANCE


def test_a_refund_may_overdraw():
    # 10 earned, 8 of them redeemed: the full refund takes the balance to -8.
    _, change = domain.points.reversal(earn(10), 10, REFUND, "", NOW, refund=True)
    assert 2 + change.delta == -8
    assert change.min_balance <= -8


def test_a_reversal_of_a_debit_gives_points_back():
    redeemed = transaction(REDEEM, DEBIT, 40, metadata={"order": "7"}, origin_id="o-7")
    manual = (redeemed.origin_kind, redeemed.origin_id)
    row, change = domain.points.reversal(redeemed, 40, manual, "cancelled", NOW, refund=False)
    assert (row.type, row.direction, row.amount, row.reverses) == (
        REVERSE,
        CREDIT,
        40,
        redeemed.id,
    )
    assert (row.origin_kind, row.origin_id, row.metadata) == (
        domain.points.OriginKind.MANUAL,
        "o-7",
        {},
    )
    assert change == domain.points.Change(
        delta=40, lifetime_delta=0, min_balance=domain.points.NO_FLOOR
    )
    assert change.closed_ok is False


def test_a_reversal_lands_on_the_account_holding_the_original():
    # A merge moved the earn to the surviving account: the reversal goes there too.
    moved = replace(earn(10), account=OTHER_ACCOUNT_ID, original_account=ACCOUNT_ID)
    row, _ = domain.points.reversal(moved, 1, REFUND, "", NOW, refund=True)
    assert row.account == OTHER_ACCOUNT_ID


# -- properties ---------------------------------------------------------------------------

earned_points = st.integers(1, domain.ids.MAX_AMOUNT)
payment_amounts = st.one_of(
    st.integers(1, 10_000), st.integers(1, domain.programs.MAX_PAYMENT_AMOUNT)
)


@st.composite
def refund_totals(draw: st.DrawFn, amount: int, full: bool) -> list[int]:
    """The running totals of a sequence of refunds of a payment of `amount`, each at least
    1; the last one is `amount` itself if `full`."""
    cuts = draw(st.lists(st.integers(1, amount), max_size=6, unique=True))
    totals = sorted(cuts)
    if full and (not totals or totals[-1] != amount):
        totals.append(amount)
    return totals


@given(
    earned=earned_points,
    amount=payment_amounts,
    full=st.booleans(),
    data=st.data(),
)
@THOROUGH
def test_a_refund_never_reverses_more_than_was_earned(earned, amount, full, data):
    """Over any sequence of partial refunds up to the payment amount, the points reversed
    add up to at most what was earned, and a full refund reverses exactly what was earned.
    Past the amount, no refund is accepted."""
    totals = data.draw(refund_totals(amount, full))
    original, refunded, reversed_total = earn(earned), 0, 0
    for total in totals:
        domain.payments.check_refund(PAYMENT_ID, amount, refunded, total - refunded)
        refunded = total
        for row, points in domain.payments.refund_reversals([original], amount, refunded):
            assert row is original and points > 0
            reversed_total += points
            original = earn(earned, original.reversed_amount + points)
        assert reversed_total <= earned
    if refunded == amount:
        assert reversed_total == earned
        with pytest.raises(domain.errors.RefundExceedsPayment):
            domain.payments.check_refund(PAYMENT_ID, amount, refunded, 1)


@given(
    earned=st.lists(earned_points, min_size=1, max_size=4),
    amount=payment_amounts,
    full=st.booleans(),
    data=st.data(),
)
@THOROUGH
def test_reversals_add_up_to_the_refunded_share_of_each_earn(earned, amount, full, data):
    """After refunds totalling R of a payment of amount A, each earn E of it has had
    floor(E x R / A) reversed in all, whatever the split of R into refunds, and whatever was
    reversed of it by hand before (counted in reversed_amount), as long as that does not
    exceed floor(E x R / A). A refund reverses nothing of an earn that has its share
    already; each earn is reversed on its own."""
    totals = data.draw(refund_totals(amount, full).filter(bool))
    final = totals[-1]
    shares = [e * final // amount for e in earned]
    # Reversed by hand before each refund: at most what keeps every earn within its share.
    earns = [earn(e, 0, number=i) for i, e in enumerate(earned)]
    for total in totals:
        for i, row in enumerate(earns):
            by_hand = data.draw(st.integers(0, shares[i] - row.reversed_amount))
            earns[i] = earn(row.amount, row.reversed_amount + by_hand, number=i)
        before = [row.reversed_amount for row in earns]
        due = {
            row.id: points for row, points in domain.payments.refund_reversals(earns, amount, total)
        }
        for i, row in enumerate(earns):
            points = due.get(row.id, 0)
            alone = domain.payments.refund_reversals([row], amount, total)
            assert alone == ([(row, points)] if points else [])
            assert points >= 0
            earns[i] = earn(row.amount, row.reversed_amount + points, number=i)
            # Each refund brings the earn up to its share so far, or leaves it.
            assert earns[i].reversed_amount == max(before[i], row.amount * total // amount)
    assert [row.reversed_amount for row in earns] == shares
    if final == amount:
        assert shares == earned
