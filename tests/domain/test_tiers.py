"""Tiers: which tier lifetime points reach, that tiers never demote, what a tier the program
no longer has becomes, and the tiers of new, welcomed and merged accounts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty_service import domain
from tests.domain.builders import (
    ACCOUNT,
    NOW,
    OTHER_ACCOUNT_ID,
    PROPERTY,
    THOROUGH,
    account,
    payment_rule,
    program,
    tiers,
    welcome_rule,
)

TIERS = tiers(("silver", 100), ("gold", 500), ("platinum", 2000))
RAISED = tiers(("silver", 1000), ("gold", 5000))
WITHOUT_GOLD = tiers(("silver", 100), ("platinum", 2000))
FROM_ZERO = tiers(("bronze", 0), ("silver", 50))
EQUAL = tiers(("a", 100), ("b", 100))

# One table of cases for the tier rule, run against both of its homes: tier_for here (merges,
# the tier a new member will have) and the kernel's tier_after in SQL (every posting:
# tests/ledger/test_kernel.py). Each case: lifetime points before and after, the program's
# tiers, the tier held, the tier expected.
TIER_CASES = [
    # The highest tier whose threshold the lifetime points reach.
    (0, 0, TIERS, "", ""),
    (0, 99, TIERS, "", ""),
    (0, 100, TIERS, "", "silver"),  # exactly at the threshold
    (99, 100, TIERS, "", "silver"),
    (0, 499, TIERS, "silver", "silver"),
    (0, 500, TIERS, "silver", "gold"),
    (0, 2500, TIERS, "", "platinum"),  # two tiers at once
    (0, 10**9, TIERS, "gold", "platinum"),
    # "" ranks below every tier: it takes what the points reach, crossed now or not.
    (600, 601, TIERS, "", "gold"),
    (0, 0, FROM_ZERO, "", "bronze"),
    (0, 49, FROM_ZERO, "bronze", "bronze"),
    (0, 50, FROM_ZERO, "bronze", "silver"),
    # A program without tiers.
    (0, 10**9, [], "", ""),
    (0, 10**9, [], "gold", "gold"),
    # Never below the tier held: thresholds raised after it was reached ...
    (0, 600, RAISED, "gold", "gold"),
    (0, 1200, RAISED, "gold", "gold"),
    (0, 600, RAISED, "silver", "silver"),
    (0, 150, TIERS, "platinum", "platinum"),
    (0, 2000, TIERS, "platinum", "platinum"),
    # ... and still rising when it reaches a higher one.
    (0, 5000, RAISED, "gold", "gold"),
    (0, 5000, RAISED, "silver", "gold"),
    (0, 2500, TIERS, "gold", "platinum"),
    # A tier the program no longer has is kept until the points cross a threshold ...
    (0, 50, TIERS, "bronze", "bronze"),
    (600, 600, TIERS, "bronze", "bronze"),
    (100, 150, TIERS, "bronze", "bronze"),  # at silver's threshold already: no crossing
    (600, 601, WITHOUT_GOLD, "gold", "gold"),
    (0, 10, FROM_ZERO, "old", "old"),  # bronze's 0 is not above 0
    # ... then the highest tier crossed replaces it, even one below what it was.
    (0, 150, TIERS, "bronze", "silver"),
    (99, 100, TIERS, "bronze", "silver"),
    (100, 2000, TIERS, "bronze", "platinum"),
    (150, 600, TIERS, "bronze", "gold"),
    (1999, 2000, WITHOUT_GOLD, "gold", "platinum"),
    (0, 150, WITHOUT_GOLD, "gold", "silver"),
    # Names are matched exactly: "Silver" is not "silver".
    (0, 50, TIERS, "Silver", "Silver"),
    (0, 100, TIERS, "Silver", "silver"),
    # Equal thresholds: the later tier of the program ranks higher.
    (0, 100, EQUAL, "", "b"),
    (100, 200, EQUAL, "b", "b"),
    # Lifetime points far past any int32.
    (0, 10**15, TIERS, "", "platinum"),
]


@pytest.mark.parametrize(("before", "after", "tiers_", "current", "expected"), TIER_CASES)
def test_tier_for(before, after, tiers_, current, expected):
    assert domain.programs.tier_for(before, after, tiers_, current) == expected


@pytest.mark.parametrize(
    ("tiers_", "expected"),
    [
        ([], ""),
        (TIERS, ""),
        (FROM_ZERO, "bronze"),
        (tiers(("first", 1)), ""),
    ],
)
def test_starting_tier(tiers_, expected):
    assert domain.programs.starting_tier(program(tiers=tiers_)) == expected


@pytest.mark.parametrize(
    ("tiers_", "rules", "expected"),
    [
        # As a payment that enrolls sees it: welcome 100 over Bronze 0 and Silver 50.
        (FROM_ZERO, [welcome_rule(100)], "silver"),
        (FROM_ZERO, [welcome_rule(30), payment_rule("1"), welcome_rule(20)], "silver"),
        (FROM_ZERO, [welcome_rule(30), welcome_rule(19)], "bronze"),
        (FROM_ZERO, [], "bronze"),
        (FROM_ZERO, [payment_rule("1000")], "bronze"),
        # Only welcome rules count, whatever else a rule holds.
        (FROM_ZERO, [payment_rule("1", points=500)], "bronze"),
        (tiers(("silver", 100), ("gold", 150)), [welcome_rule(100)], "silver"),
        (tiers(("silver", 100), ("gold", 150)), [welcome_rule(100), welcome_rule(50)], "gold"),
        (TIERS, [welcome_rule(99)], ""),
        ([], [welcome_rule(10**9)], ""),
    ],
)
def test_welcomed_tier(tiers_, rules, expected):
    assert domain.payments.welcomed_tier(program(tiers=tiers_, rules=rules)) == expected


def test_a_merge_promotes_its_target():
    source = replace(ACCOUNT, lifetime_points=400)
    target = replace(ACCOUNT, id=OTHER_ACCOUNT_ID, lifetime_points=150, tier="silver")
    merged = domain.accounts.merged_target(target, source, NOW, "crm", TIERS)
    assert (merged.lifetime_points, merged.tier, merged.version) == (550, "gold", 2)


@pytest.mark.parametrize(
    ("target", "source", "tiers_", "lifetime", "expected"),
    [
        ((150, "silver"), (400, "gold"), TIERS, 550, "gold"),
        # The source's tier is not carried over: the target's lifetime points decide.
        ((0, ""), (150, "platinum"), TIERS, 150, "silver"),
        ((2500, "platinum"), (10, "silver"), TIERS, 2510, "platinum"),
        # No lifetime points come over: no change of tier, whatever the points reach.
        ((600, ""), (0, "gold"), TIERS, 600, ""),
        ((600, ""), (1, ""), TIERS, 601, "gold"),
        # A tier the program no longer has stays until the merged points cross a threshold.
        ((50, "bronze"), (30, ""), TIERS, 80, "bronze"),
        ((50, "bronze"), (60, ""), TIERS, 110, "silver"),
        ((150, "bronze"), (300, ""), TIERS, 450, "bronze"),
        # Thresholds raised: the target keeps what it reached.
        ((600, "gold"), (100, ""), RAISED, 700, "gold"),
        ((0, ""), (10**6, ""), [], 10**6, ""),
    ],
)
def test_a_merged_target_tier(target, source, tiers_, lifetime, expected):
    target_account = account(id=OTHER_ACCOUNT_ID, lifetime_points=target[0], tier=target[1])
    source_account = account(lifetime_points=source[0], tier=source[1])
    merged = domain.accounts.merged_target(target_account, source_account, NOW, "crm", tiers_)
    assert (merged.lifetime_points, merged.tier) == (lifetime, expected)


@pytest.mark.parametrize(
    ("tiers_", "expected"),
    [
        ([], []),
        (TIERS, []),
        (FROM_ZERO, []),
        (
            tiers(("silver", 100), ("Silver", 200)),
            [domain.errors.FieldViolation("tiers[1].name", "repeats the tier name 'Silver'")],
        ),
        (
            tiers(("silver", 100), ("gold", 100)),
            [
                domain.errors.FieldViolation(
                    "tiers[1].lifetime_points", "must be greater than the previous tier's (100)"
                )
            ],
        ),
        (
            tiers(("silver", -1)),
            [domain.errors.FieldViolation("tiers[0].lifetime_points", "must not be negative")],
        ),
    ],
)
def test_tier_violations(tiers_, expected):
    assert domain.programs.tier_violations("tiers", tiers_) == expected


# Programs' tiers as tier_violations accepts them: strictly increasing thresholds from 0,
# distinct names.
valid_tiers = st.lists(st.integers(0, 10**7), unique=True, max_size=domain.programs.MAX_TIERS).map(
    lambda thresholds: [domain.programs.Tier(f"t{i}", p) for i, p in enumerate(sorted(thresholds))]
)
lifetimes = st.integers(0, 10**8)


def reached(tiers_: list[domain.programs.Tier], points: int) -> str:
    """The name of the highest tier `points` reach, or ""."""
    names = [tier.name for tier in tiers_ if tier.lifetime_points <= points]
    return names[-1] if names else ""


@given(tiers_=valid_tiers, data=st.data(), before=lifetimes, gained=lifetimes)
@THOROUGH
def test_the_tier_never_ranks_below_the_one_held(tiers_, data, before, gained):
    """With a held tier the program has, tier_for returns a tier of the program ranked at
    or above it: the held one, or the one the lifetime points reach if that is higher."""
    assert domain.programs.tier_violations("tiers", tiers_) == []
    if not tiers_:
        return
    held = data.draw(st.integers(0, len(tiers_) - 1))
    names = [tier.name for tier in tiers_]
    found = domain.programs.tier_for(before, before + gained, tiers_, names[held])
    assert names.index(found) >= held
    expected = reached(tiers_, before + gained)
    if expected and names.index(expected) > held:
        assert found == expected
    else:
        assert found == names[held]


@given(tiers_=valid_tiers, before=lifetimes, gained=lifetimes)
@PROPERTY
def test_without_a_tier_the_points_decide(tiers_, before, gained):
    """An account without a tier gets the highest one its lifetime points reach, whether it
    crossed the threshold now or before."""
    assert domain.programs.tier_for(before, before + gained, tiers_, "") == reached(
        tiers_, before + gained
    )


@given(tiers_=valid_tiers, before=lifetimes, gained=lifetimes)
@PROPERTY
def test_a_tier_the_program_no_longer_has_waits_for_a_crossing(tiers_, before, gained):
    """A held tier the program does not have is kept unless a threshold lies in
    (before, after]; then the highest tier the points reach replaces it."""
    after = before + gained
    crossed = [t for t in tiers_ if before < t.lifetime_points <= after]
    found = domain.programs.tier_for(before, after, tiers_, "gone")
    assert found == (reached(tiers_, after) if crossed else "gone")


@given(
    tiers_=valid_tiers,
    current=st.sampled_from(["", "gone", "t0", "t1", "t3"]),
    start=lifetimes,
    steps=st.lists(st.integers(0, 10**6), min_size=1, max_size=5),
)
@PROPERTY
def test_crediting_in_steps_reaches_the_tier_of_crediting_at_once(tiers_, current, start, steps):
    """Points credited earn by earn end in the tier their sum would give in one posting, so a
    welcome bonus summed (welcomed_tier) is the tier its earns credited one by one reach."""
    names = [tier.name for tier in tiers_]
    if current not in ("", "gone") and current not in names:
        current = ""
    tier, points = current, start
    for step in steps:
        tier = domain.programs.tier_for(points, points + step, tiers_, tier)
        points += step
    assert tier == domain.programs.tier_for(start, points, tiers_, current)


@given(tiers_=valid_tiers, bonuses=st.lists(st.integers(1, 10**6), max_size=4))
@PROPERTY
def test_the_welcomed_tier_is_what_the_bonus_reaches_from_the_starting_tier(tiers_, bonuses):
    """welcomed_tier is the highest tier the sum of the welcome bonuses reaches; with no
    bonus it is the starting tier."""
    rules = [welcome_rule(points, number=i) for i, points in enumerate(bonuses)]
    configured = program(tiers=tiers_, rules=rules)
    assert domain.programs.starting_tier(configured) == reached(tiers_, 0)
    assert domain.payments.welcomed_tier(configured) == reached(tiers_, sum(bonuses))
