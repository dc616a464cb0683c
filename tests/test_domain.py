"""The ledger's rules as plain Python."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from loyalty_service import domain
from loyalty_service.domain import (
    Account,
    AccountStatus,
    Direction,
    OriginKind,
    PointsTransaction,
    TransactionType,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ACCOUNT = Account(
    id="loy_" + "a" * 20,
    program="prog_default",
    customer="cust_1",
    status=AccountStatus.ACTIVE,
    balance=100,
    lifetime_points=150,
    tier="",
    metadata={},
    create_time=NOW,
    update_time=NOW,
)


def transaction(type_: TransactionType, direction: Direction, amount: int, reversed_: int = 0):
    return PointsTransaction(
        id="ptx_" + "a" * 20,
        account=ACCOUNT.id,
        type=type_,
        direction=direction,
        amount=amount,
        points_after=0,
        reason="",
        origin_kind=OriginKind.MANUAL,
        origin_id="",
        metadata={},
        create_time=NOW,
        reversed_amount=reversed_,
    )


@pytest.mark.parametrize(
    ("type_", "direction", "amount", "balance", "lifetime"),
    [
        (TransactionType.EARN, Direction.CREDIT, 10, 110, 160),
        (TransactionType.ADJUST, Direction.CREDIT, 10, 110, 160),
        (TransactionType.REVERSE, Direction.CREDIT, 10, 110, 150),
        (TransactionType.REDEEM, Direction.DEBIT, 100, 0, 150),
        (TransactionType.ADJUST, Direction.DEBIT, 30, 70, 150),
        (TransactionType.EXPIRE, Direction.DEBIT, 1, 99, 150),
    ],
)
def test_post_moves_balance_and_lifetime(type_, direction, amount, balance, lifetime):
    change = domain.change(type_, direction, amount)
    assert domain.check(ACCOUNT, change) == domain.Posting(balance, lifetime)


def test_debits_may_not_overdraw_except_reversals():
    with pytest.raises(domain.InsufficientPoints) as caught:
        domain.check(ACCOUNT, domain.change(TransactionType.REDEEM, Direction.DEBIT, 101))
    assert caught.value.metadata == {"balance": "100", "requested": "101"}
    change = domain.change(TransactionType.REVERSE, Direction.DEBIT, 130, may_overdraw=True)
    assert change == domain.Change(delta=-130, lifetime_delta=0, min_balance=domain.NO_FLOOR)
    assert domain.check(ACCOUNT, change) == domain.Posting(-30, 150)


def test_balance_limit():
    rich = replace(ACCOUNT, balance=domain.MAX_BALANCE)
    with pytest.raises(domain.BalanceLimitExceeded):
        domain.check(rich, domain.change(TransactionType.EARN, Direction.CREDIT, 1))


@pytest.mark.parametrize("status", [AccountStatus.CLOSED, AccountStatus.MERGED])
def test_inactive_accounts_take_nothing(status):
    with pytest.raises(domain.AccountNotActive) as caught:
        domain.check(
            replace(ACCOUNT, status=status),
            domain.change(TransactionType.EARN, Direction.CREDIT, 1),
        )
    assert caught.value.reason == "ACCOUNT_NOT_ACTIVE"


def test_reversal_amounts():
    earned = transaction(TransactionType.EARN, Direction.CREDIT, 50, reversed_=20)
    assert domain.check_reversal(earned, None) == 30
    assert domain.check_reversal(earned, 30) == 30
    with pytest.raises(domain.AlreadyReversed) as caught:
        domain.check_reversal(earned, 31)
    assert caught.value.metadata["reversible"] == "30"
    with pytest.raises(domain.AlreadyReversed):
        domain.check_reversal(replace(earned, reversed_amount=50), None)
    with pytest.raises(domain.NotReversible):
        domain.check_reversal(transaction(TransactionType.REVERSE, Direction.DEBIT, 5), None)


def test_merge_rules():
    other = replace(ACCOUNT, id="loy_" + "b" * 20, balance=5, lifetime_points=7)
    domain.check_merge(ACCOUNT, other)
    assert domain.merged_target(other, ACCOUNT, NOW, []).balance == 105
    assert domain.merged_target(other, ACCOUNT, NOW, []).lifetime_points == 157
    with pytest.raises(domain.ProgramMismatch):
        domain.check_merge(ACCOUNT, replace(other, program="prog_other"))
    with pytest.raises(domain.AccountNotActive):
        domain.check_merge(ACCOUNT, replace(other, status=AccountStatus.CLOSED))


TIERS = [domain.Tier("silver", 100), domain.Tier("gold", 500), domain.Tier("platinum", 2000)]


def test_the_tier_is_the_highest_whose_threshold_the_lifetime_points_reach():
    assert domain.tier_for(0, 99, TIERS, "") == ""
    assert domain.tier_for(0, 100, TIERS, "") == "silver"  # exactly at the threshold
    assert domain.tier_for(0, 499, TIERS, "silver") == "silver"
    assert domain.tier_for(0, 2500, TIERS, "") == "platinum"  # two tiers at once
    assert domain.tier_for(0, 10**9, [], "") == ""  # a program without tiers


def test_tiers_never_demote():
    # Thresholds raised after the account reached gold: it keeps gold ...
    raised = [domain.Tier("silver", 1000), domain.Tier("gold", 5000)]
    assert domain.tier_for(0, 600, raised, "gold") == "gold"
    assert domain.tier_for(0, 1200, raised, "gold") == "gold"
    # ... and still rises when it reaches a higher one.
    assert domain.tier_for(0, 5000, raised, "gold") == "gold"
    assert domain.tier_for(0, 2500, TIERS, "gold") == "platinum"
    # A tier the program no longer has (renamed, removed) is kept until the points cross a
    # threshold: then the highest tier crossed replaces it.
    assert domain.tier_for(0, 50, TIERS, "bronze") == "bronze"
    assert domain.tier_for(0, 150, TIERS, "bronze") == "silver"
    without_gold = [domain.Tier("silver", 100), domain.Tier("platinum", 2000)]
    assert domain.tier_for(600, 601, without_gold, "gold") == "gold"  # crosses nothing
    assert domain.tier_for(1999, 2000, without_gold, "gold") == "platinum"


def test_a_merge_promotes_its_target():
    source = replace(ACCOUNT, lifetime_points=400)
    target = replace(ACCOUNT, id="loy_" + "b" * 20, lifetime_points=150, tier="silver")
    merged = domain.merged_target(target, source, NOW, TIERS)
    assert (merged.lifetime_points, merged.tier, merged.version) == (550, "gold", 2)


def test_new_ids():
    ids = {domain.new_id("loy_") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(domain.ACCOUNT_ID.match(i) for i in ids)


def test_a_stream_may_start_from_just_before_the_oldest_event_to_the_newest():
    domain.check_position(4, oldest=5, newest=9)
    domain.check_position(9, oldest=5, newest=9)
    domain.check_position(9, oldest=10, newest=9)  # nothing retained
    with pytest.raises(domain.EventPositionExpired) as expired:
        domain.check_position(3, oldest=5, newest=9)
    assert expired.value.metadata == {"position": "3", "oldestPosition": "5"}
    with pytest.raises(domain.EventPositionAhead):
        domain.check_position(10, oldest=5, newest=9)


def test_event_filters():
    now = datetime.now(UTC)
    event = domain.Event("evt_x", domain.EventType.ACCOUNT_CLOSED, now, "prog_a", "loy_a", None)  # type: ignore[arg-type]
    closed = frozenset({domain.EventType.ACCOUNT_CLOSED})
    assert domain.EventFilter(closed).matches(event)
    assert domain.EventFilter(closed, program="prog_a", account="loy_a").matches(event)
    assert not domain.EventFilter(closed, program="prog_b").matches(event)
    assert not domain.EventFilter(closed, account="loy_b").matches(event)
    assert not domain.EventFilter(domain.TRANSACTION_EVENT_TYPES).matches(event)
