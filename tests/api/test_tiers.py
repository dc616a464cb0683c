"""Tier promotion through the real server: an account's tier follows its lifetime points, in
the transaction that changes them, with a loyalty.account.tier_changed event."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import psycopg
import pytest
from alembic import command
from alembic.config import Config

from loyalty_service import db
from loyalty_service.pb import accounts_pb2
from tests.events_support import account_events, all_events, event_of
from tests.support import (
    ADJUST,
    CREDIT,
    EARN,
    REDEEM,
    create_account,
    create_program,
    get,
    post,
    reverse,
    tiers,
    unique,
    update_program,
)

TIER_CHANGED = "loyalty.account.tier_changed"
CREATED = "points_transaction.created"


def tiered_program(programs, *pairs: tuple[str, int]) -> str:
    return create_program(programs, name="Tiered", tiers=tiers(*pairs)).id


def member(accounts, programs) -> accounts_pb2.Account:
    program = tiered_program(programs, ("silver", 100), ("gold", 500), ("platinum", 2000))
    return create_account(accounts, program=program)


def events_of(channel, account: str) -> list:
    return [event_of(e) for e in all_events(channel, account=account)]


def test_promotion_exactly_at_the_threshold(accounts, points, programs, assert_invariants):
    a = member(accounts, programs)
    assert a.tier == ""
    post(points, a.id, EARN, 99)
    assert get(accounts, a.id).tier == ""
    post(points, a.id, EARN, 1)
    promoted = get(accounts, a.id)
    assert (promoted.tier, promoted.lifetime_points, promoted.version) == ("silver", 100, 3)
    assert_invariants()


def test_an_earn_that_jumps_two_tiers_lands_in_the_highest(channel, accounts, points, programs):
    a = member(accounts, programs)
    post(points, a.id, EARN, 600)
    assert get(accounts, a.id).tier == "gold"
    post(points, a.id, EARN, 5000, request_id=unique("req"))
    assert get(accounts, a.id).tier == "platinum"
    # One event per promotion, however many tiers it passes.
    tier_events = [e for e in events_of(channel, a.id) if e.type == TIER_CHANGED]
    assert [e.snapshot.tier for e in tier_events] == ["gold", "platinum"]


def test_a_tier_from_zero_points_holds_from_enrollment(channel, accounts, points, programs):
    program = tiered_program(programs, ("member", 0), ("silver", 100))
    a = accounts.CreateAccount(accounts_pb2.CreateAccountRequest(program=program))
    assert a.tier == "member" == get(accounts, a.id).tier
    post(points, a.id, EARN, 100)
    listed = events_of(channel, a.id)
    assert [(e.type, e.snapshot.tier) for e in listed if e.type != CREATED] == [
        ("loyalty.account.created", "member"),
        (TIER_CHANGED, "silver"),
    ]


def test_an_adjust_credit_promotes(accounts, points, programs):
    a = member(accounts, programs)
    post(points, a.id, ADJUST, 150, direction=CREDIT, reason="goodwill")
    assert get(accounts, a.id).tier == "silver"


def test_redeems_and_reversals_never_demote(accounts, points, programs, assert_invariants):
    a = member(accounts, programs)
    earned = post(points, a.id, EARN, 600)
    redeemed = post(points, a.id, REDEEM, 550)
    assert get(accounts, a.id).tier == "gold"
    reverse(points, earned.id)
    # The reversal leaves a negative balance; lifetime points and the tier stay.
    after = get(accounts, a.id)
    assert (after.balance, after.lifetime_points, after.tier) == (-550, 600, "gold")
    # Reversing a redeem is a credit, but not one that counts towards lifetime points.
    reverse(points, redeemed.id)
    assert get(accounts, a.id).tier == "gold"
    assert_invariants()


def test_raised_thresholds_keep_the_tier_reached(accounts, points, programs):
    a = member(accounts, programs)
    post(points, a.id, EARN, 600)
    update_program(programs, a.program, ["tiers"], tiers=tiers(("silver", 1000), ("gold", 5000)))
    post(points, a.id, EARN, 500)  # 1100: reaches silver, which ranks below gold
    assert get(accounts, a.id).tier == "gold"


def test_the_event_sequence(channel, accounts, points, programs):
    a = member(accounts, programs)
    stream = account_events(accounts, account=a.id)
    post(points, a.id, EARN, 50)
    earned = post(points, a.id, EARN, 60, request_id="tier-earn-" + a.id)
    again = post(points, a.id, EARN, 60, request_id="tier-earn-" + a.id)  # a replay
    assert again == earned
    post(points, a.id, EARN, 3000)

    listed = events_of(channel, a.id)
    assert [e.type for e in listed] == [
        "loyalty.account.created",
        CREATED,
        CREATED,
        TIER_CHANGED,
        CREATED,
        TIER_CHANGED,
    ]
    positions = [e.position for e in listed]
    # Each tier_changed comes right after the transaction that caused it.
    assert positions[3] == positions[2] + 1 and positions[5] == positions[4] + 1
    assert listed[2].snapshot == earned
    silver, platinum = listed[3].snapshot, listed[5].snapshot
    assert (silver.tier, silver.lifetime_points, silver.balance, silver.version) == (
        "silver",
        110,
        110,
        3,
    )
    assert (platinum.tier, platinum.lifetime_points, platinum.version) == ("platinum", 3110, 4)
    assert platinum == get(accounts, a.id)
    assert all(e.id.startswith("evt_") and len(e.id) == 24 for e in listed)
    assert len({e.id for e in listed}) == len(listed)

    # The account stream delivers the same tier events, in the same order.
    streamed = stream.events(2)
    assert [(e.type, e.position, e.snapshot) for e in streamed] == [
        (e.type, e.position, e.snapshot) for e in listed if e.type == TIER_CHANGED
    ]
    stream.cancel()


def test_a_merge_promotes_the_target(channel, accounts, points, programs, assert_invariants):
    target = member(accounts, programs)
    source = accounts.CreateAccount(
        accounts_pb2.CreateAccountRequest(program=target.program, customer=unique())
    )
    post(points, target.id, EARN, 150)
    post(points, source.id, EARN, 400)
    merged = accounts.MergeAccounts(
        accounts_pb2.MergeAccountsRequest(source=source.id, target=target.id)
    )
    assert (merged.target.tier, merged.target.lifetime_points) == ("gold", 550)
    assert merged.source.tier == "silver"  # frozen as it was
    listed = events_of(channel, target.id)
    assert [e.type for e in listed[-2:]] == ["loyalty.account.updated", TIER_CHANGED]
    assert listed[-1].position == listed[-2].position + 1
    assert listed[-1].snapshot == merged.target == listed[-2].snapshot
    assert_invariants()


def test_a_merge_that_reaches_no_new_tier_writes_no_tier_event(channel, accounts, programs):
    target = member(accounts, programs)
    source = accounts.CreateAccount(
        accounts_pb2.CreateAccountRequest(program=target.program, customer=unique())
    )
    accounts.MergeAccounts(accounts_pb2.MergeAccountsRequest(source=source.id, target=target.id))
    assert TIER_CHANGED not in [e.type for e in events_of(channel, target.id)]


def test_a_program_without_tiers_promotes_no_one(channel, accounts, points):
    a = accounts.CreateAccount(
        accounts_pb2.CreateAccountRequest(program="prog_default", customer=unique())
    )
    post(points, a.id, EARN, 1_000_000)
    assert get(accounts, a.id).tier == ""
    assert TIER_CHANGED not in [e.type for e in events_of(channel, a.id)]


def test_concurrent_earns_cross_each_threshold_once(
    channel, accounts, points, programs, assert_invariants
):
    program = tiered_program(programs, ("bronze", 500), ("silver", 1500), ("gold", 3000))
    a = accounts.CreateAccount(accounts_pb2.CreateAccountRequest(program=program))
    # Other accounts in the same batches, some of them promoted too.
    others = [
        accounts.CreateAccount(accounts_pb2.CreateAccountRequest(program=program)) for _ in range(4)
    ]

    def earn(thread: int) -> None:
        for n in range(25):
            post(points, a.id, EARN, 10, request_id=f"{a.id}-{thread}-{n}")
            post(points, others[thread % 4].id, EARN, 20)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(earn, range(16)))

    final = get(accounts, a.id)
    assert (final.lifetime_points, final.tier, final.version) == (4000, "gold", 401)
    listed = events_of(channel, a.id)
    tier_events = [e for e in listed if e.type == TIER_CHANGED]
    assert [e.snapshot.tier for e in tier_events] == ["bronze", "silver", "gold"]
    assert [e.snapshot.lifetime_points for e in tier_events] == [500, 1500, 3000]
    for before, event in pairwise(listed):
        if event.type == TIER_CHANGED:
            assert before.type == CREATED and event.position == before.position + 1
            assert before.snapshot.points_after == event.snapshot.balance
    for other in others:
        got = get(accounts, other.id)
        assert (got.lifetime_points, got.tier) == (2000, "silver")
        assert [
            e.snapshot.tier for e in events_of(channel, other.id) if e.type == TIER_CHANGED
        ] == [
            "bronze",
            "silver",
        ]
    # The whole log stays one run of positions.
    everything = [event_of(e).position for e in all_events(channel)]
    assert everything == list(range(everything[0], everything[0] + len(everything)))
    assert_invariants()


def test_migration_0004_admits_tier_changed_events_and_goes_down_again(databases):
    url = databases.create_empty()
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS))
    config.set_main_option("sqlalchemy.url", db.sqlalchemy_url(url).replace("%", "%%"))
    insert = (
        "INSERT INTO events (position, id, type, create_time, program_id, account_id, snapshot)"
        " VALUES (%s, 'evt_x', %s, now(), 'prog_default', 'loy_x', '{}')"
    )
    command.upgrade(config, "0003")
    with (
        psycopg.connect(db.libpq_url(url), autocommit=True) as conn,
        pytest.raises(psycopg.errors.CheckViolation),
    ):
        conn.execute(insert, [1, TIER_CHANGED])
    command.upgrade(config, "head")
    command.downgrade(config, "0003")
    command.upgrade(config, "head")
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        conn.execute(insert, [1, TIER_CHANGED])
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(insert, [2, "loyalty.account.nope"])


def test_a_removed_tier_is_kept_until_a_threshold_is_crossed(accounts, points, programs):
    a = member(accounts, programs)
    post(points, a.id, EARN, 600)  # gold
    update_program(programs, a.program, ["tiers"], tiers=tiers(("silver", 100), ("platinum", 2000)))
    post(points, a.id, EARN, 1)  # 601: silver's threshold is below, but it crossed none
    assert get(accounts, a.id).tier == "gold"
    post(points, a.id, EARN, 1399)  # 2000: crosses platinum's
    assert get(accounts, a.id).tier == "platinum"
