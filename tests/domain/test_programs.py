"""Programs: what is wrong with their earning rules and tiers, the versions of changed
rules, and when a program takes new accounts or may change its currency."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty_service import domain
from tests.domain.builders import (
    DAY,
    PROGRAM_ID,
    PROPERTY,
    payment_rule,
    program,
    rule_id,
    spelled,
    tiers,
    welcome_rule,
)

PATH = "program.earning_rules"
SILVER = tiers(("Silver", 100), ("Gold", 500))
V = domain.errors.FieldViolation
NOT_PLAIN_RATE = "must be a plain decimal with at most 4 decimal places, e.g. '1.5'"
NOT_PLAIN_MULTIPLIER = "must be a plain decimal with at most 2 decimal places, e.g. '1.5'"
RATE_RANGE = "must be greater than 0 and at most 1000000"
MULTIPLIER_RANGE = "must be greater than 0 and at most 100"
PAYMENT_ONLY = "applies to payment rules only; must be unset"


def violation(index: int, name: str, description: str) -> domain.errors.FieldViolation:
    return V(f"{PATH}[{index}].{name}", description)


@pytest.mark.parametrize(
    "rules",
    [
        [],
        [payment_rule("1")],
        [welcome_rule(1)],
        [welcome_rule(domain.ids.MAX_AMOUNT)],
        [payment_rule("0.0001"), payment_rule("1000000"), payment_rule("1000000.0000")],
        [payment_rule("1", name="n" * 200)],
        [
            payment_rule(
                "1", min_amount=domain.programs.MAX_PAYMENT_AMOUNT, max_points=domain.ids.MAX_AMOUNT
            )
        ],
        [payment_rule("1", multipliers={"Silver": "100", "Gold": "0.01"})],
        [payment_rule("1", multipliers={"Silver": "1.50"})],
        [payment_rule("1", start_time=DAY, end_time=DAY + timedelta(microseconds=1))],
        [payment_rule("1", start_time=DAY)],
        [payment_rule("1", end_time=DAY)],
        [payment_rule("1") for _ in range(domain.programs.MAX_RULES)],
    ],
)
def test_valid_rules(rules):
    assert domain.programs.rule_violations(PATH, rules, SILVER) == []


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ([payment_rule("abc")], [violation(0, "points_per_unit", NOT_PLAIN_RATE)]),
        ([payment_rule("0")], [violation(0, "points_per_unit", RATE_RANGE)]),
        ([payment_rule("0.0000")], [violation(0, "points_per_unit", RATE_RANGE)]),
        ([payment_rule("-1")], [violation(0, "points_per_unit", NOT_PLAIN_RATE)]),
        ([payment_rule("0.00001")], [violation(0, "points_per_unit", NOT_PLAIN_RATE)]),
        ([payment_rule("1.23456")], [violation(0, "points_per_unit", NOT_PLAIN_RATE)]),
        ([payment_rule("1000001")], [violation(0, "points_per_unit", RATE_RANGE)]),
        ([payment_rule("1000000.0001")], [violation(0, "points_per_unit", RATE_RANGE)]),
        ([payment_rule("")], [violation(0, "points_per_unit", "is required")]),
        (
            [welcome_rule(10), payment_rule("1,5")],
            [violation(1, "points_per_unit", NOT_PLAIN_RATE)],
        ),
        (
            [payment_rule("1", points=5)],
            [violation(0, "points", "applies to welcome rules only; must be 0")],
        ),
        (
            [payment_rule("1", min_amount=-1)],
            [violation(0, "min_amount", "must be between 0 and 1000000000000000")],
        ),
        (
            [payment_rule("1", min_amount=domain.programs.MAX_PAYMENT_AMOUNT + 1)],
            [violation(0, "min_amount", "must be between 0 and 1000000000000000")],
        ),
        (
            [payment_rule("1", max_points=-1)],
            [violation(0, "max_points", "must be between 0 (no cap) and 1000000000")],
        ),
        (
            [payment_rule("1", max_points=domain.ids.MAX_AMOUNT + 1)],
            [violation(0, "max_points", "must be between 0 (no cap) and 1000000000")],
        ),
        (
            [payment_rule("1", name="n" * 201)],
            [violation(0, "name", "is longer than 200 characters")],
        ),
        (
            [welcome_rule(5, name="a\x00b")],
            [violation(0, "name", "must not contain the character U+0000")],
        ),
        (
            [payment_rule("1", start_time=DAY, end_time=DAY)],
            [violation(0, "end_time", "must be after start_time")],
        ),
        (
            [payment_rule("1", start_time=DAY, end_time=DAY - timedelta(days=1))],
            [violation(0, "end_time", "must be after start_time")],
        ),
        (
            [welcome_rule(0)],
            [violation(0, "points", "must be between 1 and 1000000000 for a welcome rule")],
        ),
        (
            [welcome_rule(-5)],
            [violation(0, "points", "must be between 1 and 1000000000 for a welcome rule")],
        ),
        (
            [welcome_rule(domain.ids.MAX_AMOUNT + 1)],
            [violation(0, "points", "must be between 1 and 1000000000 for a welcome rule")],
        ),
        (
            [welcome_rule(10, points_per_unit="1")],
            [violation(0, "points_per_unit", PAYMENT_ONLY)],
        ),
        (
            [
                welcome_rule(
                    10,
                    points_per_unit="1",
                    min_amount=1,
                    max_points=1,
                    tier_multipliers=[domain.programs.TierMultiplier("Silver", "2")],
                    start_time=DAY,
                    end_time=DAY,
                )
            ],
            [
                violation(0, name, PAYMENT_ONLY)
                for name in (
                    "points_per_unit",
                    "min_amount",
                    "max_points",
                    "tier_multipliers",
                    "start_time",
                    "end_time",
                )
            ],
        ),
        (
            [payment_rule("1", multipliers={"Platinum": "2"})],
            [violation(0, "tier_multipliers[0].tier", "'Platinum' is not a tier of the program")],
        ),
        (
            [payment_rule("1", multipliers={"silver": "2"})],  # names match exactly
            [violation(0, "tier_multipliers[0].tier", "'silver' is not a tier of the program")],
        ),
        (
            [payment_rule("1", multipliers={"x" * 50: "2"})],  # named as cut
            [
                violation(
                    0, "tier_multipliers[0].tier", f"{'x' * 40!r} is not a tier of the program"
                )
            ],
        ),
        (
            [payment_rule("1", multipliers={"Silver": "0"})],
            [violation(0, "tier_multipliers[0].multiplier", MULTIPLIER_RANGE)],
        ),
        (
            [payment_rule("1", multipliers={"Silver": "1.234"})],
            [violation(0, "tier_multipliers[0].multiplier", NOT_PLAIN_MULTIPLIER)],
        ),
        (
            [payment_rule("1", multipliers={"Silver": "101"})],
            [violation(0, "tier_multipliers[0].multiplier", MULTIPLIER_RANGE)],
        ),
        (
            [payment_rule("1", multipliers={"Silver": "100.01"})],
            [violation(0, "tier_multipliers[0].multiplier", MULTIPLIER_RANGE)],
        ),
        (
            [
                payment_rule(
                    "1",
                    tier_multipliers=[
                        domain.programs.TierMultiplier("Silver", "2"),
                        domain.programs.TierMultiplier("Silver", "3"),
                    ],
                )
            ],
            [violation(0, "tier_multipliers[1].tier", "repeats the tier 'Silver'")],
        ),
        (
            [payment_rule("1", multipliers={"Platinum": "0"})],
            [
                violation(0, "tier_multipliers[0].tier", "'Platinum' is not a tier of the program"),
                violation(0, "tier_multipliers[0].multiplier", MULTIPLIER_RANGE),
            ],
        ),
        (
            [payment_rule("1") for _ in range(domain.programs.MAX_RULES + 1)],
            [V(PATH, "has more than 20 rules")],
        ),
        # Every problem of every rule, in order.
        (
            [
                payment_rule("0", min_amount=-1, name="n" * 201),
                welcome_rule(0),
                payment_rule("1"),
                payment_rule("", max_points=-1, start_time=DAY, end_time=DAY),
            ],
            [
                violation(0, "name", "is longer than 200 characters"),
                violation(0, "points_per_unit", RATE_RANGE),
                violation(0, "min_amount", "must be between 0 and 1000000000000000"),
                violation(1, "points", "must be between 1 and 1000000000 for a welcome rule"),
                violation(3, "points_per_unit", "is required"),
                violation(3, "max_points", "must be between 0 (no cap) and 1000000000"),
                violation(3, "end_time", "must be after start_time"),
            ],
        ),
    ],
)
def test_rule_violations(rules, expected):
    assert domain.programs.rule_violations(PATH, rules, SILVER) == expected


def test_rules_are_judged_by_the_tiers_given():
    rules = [payment_rule("1", multipliers={"Silver": "2"})]
    assert domain.programs.rule_violations(PATH, rules, SILVER) == []
    assert domain.programs.rule_violations(PATH, rules, tiers(("Gold", 500))) == [
        violation(0, "tier_multipliers[0].tier", "'Silver' is not a tier of the program")
    ]


# -- versions -----------------------------------------------------------------------------


def saved(*rules: domain.programs.EarningRule) -> list[domain.programs.EarningRule]:
    return [replace(rule, id=rule_id(i), version=1) for i, rule in enumerate(rules)]


def test_new_rules_get_ids_and_version_1():
    requested = [payment_rule("1", id=""), welcome_rule(5, id="", version=7)]
    result = domain.programs.versioned_rules(PATH, [], requested)
    assert [(rule.version, rule.points_per_unit, rule.points) for rule in result] == [
        (1, "1", 0),
        (1, "", 5),
    ]
    assert all(domain.ids.RULE_ID.fullmatch(rule.id) for rule in result)
    assert result[0].id != result[1].id
    assert [replace(rule, id="", version=0) for rule in result] == [
        replace(rule, version=0) for rule in requested
    ]


def test_update_rules_versions():
    base, promo = saved(payment_rule("1", name="Base"), payment_rule("2", name="Promo"))
    changed_promo = replace(promo, points_per_unit="3")
    added = payment_rule("0.5", name="New", id="")
    kept, bumped, new = domain.programs.versioned_rules(
        PATH, [base, promo], [base, changed_promo, added]
    )
    assert kept is base
    assert bumped == replace(changed_promo, version=2)
    assert (new.version, new.points_per_unit, new.name) == (1, "0.5", "New")
    assert new.id not in (base.id, promo.id)
    # The same list again changes no version; a renamed rule is a change; a rule left out is
    # removed and the order given is the new order.
    again = domain.programs.versioned_rules(PATH, [kept, bumped, new], [kept, bumped, new])
    assert [(r.id, r.version) for r in again] == [(base.id, 1), (promo.id, 2), (new.id, 1)]
    renamed = replace(kept, name="Base, renamed")
    final = domain.programs.versioned_rules(PATH, again, [bumped, renamed])
    assert [(r.id, r.version, r.name) for r in final] == [
        (promo.id, 2, "Promo"),
        (base.id, 2, "Base, renamed"),
    ]


@pytest.mark.parametrize(
    ("change", "bumped"),
    [
        ({}, False),
        ({"version": 99}, False),  # the version sent is ignored
        ({"points_per_unit": "1.50"}, False),
        ({"points_per_unit": "1.5000"}, False),
        ({"points_per_unit": "01.5"}, False),
        ({"tier_multipliers": [domain.programs.TierMultiplier("Gold", "2.0")]}, False),
        ({"tier_multipliers": [domain.programs.TierMultiplier("Gold", "2.00")]}, False),
        ({"points_per_unit": "1.51"}, True),
        ({"points_per_unit": "1.5", "version": 99}, False),
        ({"points_per_unit": "1.51", "version": 99}, True),
        ({"tier_multipliers": [domain.programs.TierMultiplier("Gold", "2.5")]}, True),
        ({"tier_multipliers": [domain.programs.TierMultiplier("Silver", "2")]}, True),
        ({"tier_multipliers": []}, True),
        ({"name": "Renamed"}, True),
        ({"min_amount": 1}, True),
        ({"max_points": 1}, True),
        ({"start_time": DAY}, True),
        ({"end_time": DAY}, True),
        ({"trigger": domain.programs.RuleTrigger.ACCOUNT_CREATED}, True),
    ],
)
def test_a_change_of_a_rule_is_a_new_version(change, bumped):
    (current,) = saved(payment_rule("1.5", multipliers={"Gold": "2"}))
    current = replace(current, version=3)
    (result,) = domain.programs.versioned_rules(PATH, [current], [replace(current, **change)])
    if bumped:
        assert result == replace(current, **{**change, "version": 4})
    else:
        # Unchanged: the rule as it was saved, in its spelling.
        assert result is current


def test_unknown_and_repeated_rule_ids_are_invalid():
    current = saved(payment_rule("1"), payment_rule("2"))
    unknown = payment_rule("1", id="rule_" + "Z" * 20)
    with pytest.raises(domain.errors.InvalidArgument) as caught:
        domain.programs.versioned_rules(
            PATH, current, [current[0], unknown, current[0], current[1]]
        )
    assert caught.value.violations == [
        V(f"{PATH}[1].id", "is not a rule of the program"),
        V(f"{PATH}[2].id", "repeats a rule"),
    ]
    assert caught.value.metadata == {"fields": f"{PATH}[1].id,{PATH}[2].id"}
    assert caught.value.message == (
        f"{PATH}[1].id: is not a rule of the program; {PATH}[2].id: repeats a rule"
    )
    # Another program's rule id is unknown here too.
    with pytest.raises(domain.errors.InvalidArgument) as caught:
        domain.programs.versioned_rules(PATH, current[:1], [current[0], current[1]])
    assert caught.value.violations == [V(f"{PATH}[1].id", "is not a rule of the program")]


@given(
    rate=st.integers(1, domain.programs.MAX_POINTS_PER_UNIT * 10**domain.programs.RATE_PLACES),
    multiplier=st.integers(
        1, domain.programs.MAX_MULTIPLIER * 10**domain.programs.MULTIPLIER_PLACES
    ),
    saved_as=st.tuples(st.integers(0, 4), st.integers(0, 2)),
    sent_as=st.tuples(st.integers(0, 4), st.integers(0, 2)),
)
@PROPERTY
def test_a_decimal_spelled_otherwise_is_no_new_version(rate, multiplier, saved_as, sent_as):
    """The same rate and multiplier, spelled with other trailing or leading zeros, is no
    change: the rule keeps its version, and the spelling it was saved with."""

    def rule(zeros: int, leading: int) -> domain.programs.EarningRule:
        return payment_rule(
            spelled(rate, domain.programs.RATE_PLACES, zeros, leading),
            multipliers={
                "Gold": spelled(multiplier, domain.programs.MULTIPLIER_PLACES, zeros, leading)
            },
            version=5,
        )

    current = rule(*saved_as)
    (result,) = domain.programs.versioned_rules(PATH, [current], [rule(*sent_as)])
    assert result is current
    (bumped,) = domain.programs.versioned_rules(
        PATH, [current], [replace(rule(*sent_as), points_per_unit=spelled(rate + 1, 4))]
    )
    assert bumped.version == 6


# -- tiers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tiers_", "expected"),
    [
        ([domain.programs.Tier(f"t{i}", i) for i in range(domain.programs.MAX_TIERS)], []),
        (
            [domain.programs.Tier(f"t{i}", i) for i in range(domain.programs.MAX_TIERS + 1)],
            [V("tiers", "has more than 20 tiers")],
        ),
        (tiers(("x" * 40, 0)), []),
        (tiers(("x" * 41, 0)), [V("tiers[0].name", "must be 1 to 40 characters")]),
        (tiers(("", 0)), [V("tiers[0].name", "must be 1 to 40 characters")]),
        (tiers(("a\x00", 0)), [V("tiers[0].name", "must not contain the character U+0000")]),
        (tiers(("   ", 0)), [V("tiers[0].name", "must not be blank")]),
        (tiers(("\t\n", 0)), [V("tiers[0].name", "must not be blank")]),
        (tiers(("Gold", 0), ("gold", 1)), [V("tiers[1].name", "repeats the tier name 'gold'")]),
        # Repeats are judged ignoring case, as people read them.
        (
            tiers(("Straße", 0), ("STRASSE", 1)),
            [V("tiers[1].name", "repeats the tier name 'STRASSE'")],
        ),
        # A bad name is reported for what it is, not as a repeat.
        (
            tiers(("   ", 0), ("   ", 1)),
            [V("tiers[0].name", "must not be blank"), V("tiers[1].name", "must not be blank")],
        ),
        (tiers(("a", -1)), [V("tiers[0].lifetime_points", "must not be negative")]),
        (
            tiers(("a", -5), ("b", -3)),
            [
                V("tiers[0].lifetime_points", "must not be negative"),
                V("tiers[1].lifetime_points", "must not be negative"),
            ],
        ),
        (tiers(("a", -5), ("b", 0)), [V("tiers[0].lifetime_points", "must not be negative")]),
        (
            tiers(("a", 100), ("b", 100)),
            [V("tiers[1].lifetime_points", "must be greater than the previous tier's (100)")],
        ),
        (
            tiers(("a", 100), ("b", 50), ("c", 75)),
            [V("tiers[1].lifetime_points", "must be greater than the previous tier's (100)")],
        ),
        (tiers(("a", 0), ("b", 1)), []),
        # Every problem of every tier, the name's before the threshold's.
        (
            tiers(("Gold", 10), ("GOLD", 10), ("", -1)),
            [
                V("tiers[1].name", "repeats the tier name 'GOLD'"),
                V("tiers[1].lifetime_points", "must be greater than the previous tier's (10)"),
                V("tiers[2].name", "must be 1 to 40 characters"),
                V("tiers[2].lifetime_points", "must not be negative"),
            ],
        ),
    ],
)
def test_tier_violation_edges(tiers_, expected):
    assert domain.programs.tier_violations("tiers", tiers_) == expected


# -- the program's status and currency ----------------------------------------------------


def test_an_archived_program_takes_no_new_accounts():
    assert domain.programs.require_program_active(program()) is None
    with pytest.raises(domain.errors.ProgramNotActive) as caught:
        domain.programs.require_program_active(
            program(status=domain.programs.ProgramStatus.ARCHIVED)
        )
    assert caught.value.reason == "PROGRAM_NOT_ACTIVE"
    assert caught.value.metadata == {"program": PROGRAM_ID, "status": "ARCHIVED"}
    assert caught.value.message == (
        f"program {PROGRAM_ID} is ARCHIVED, not ACTIVE: it takes no new accounts"
    )


@pytest.mark.parametrize(
    ("currency", "has_accounts", "locked"),
    [
        ("EUR", True, False),  # no change
        ("EUR", False, False),
        ("USD", False, False),
        ("USD", True, True),
    ],
)
def test_the_currency_is_fixed_once_the_program_has_accounts(currency, has_accounts, locked):
    euros = program(currency="EUR")
    if not locked:
        assert domain.programs.check_currency_change(euros, currency, has_accounts) is None
        return
    with pytest.raises(domain.errors.CurrencyLocked) as caught:
        domain.programs.check_currency_change(euros, currency, has_accounts)
    assert caught.value.metadata == {"program": PROGRAM_ID, "currency": "EUR", "requested": "USD"}
    assert caught.value.message == (
        f"program {PROGRAM_ID} has accounts, whose points were earned in EUR;"
        " its currency cannot change to USD"
    )


# -- invalid arguments --------------------------------------------------------------------


def test_invalid_argument_reports_the_first_violations_and_counts_the_rest():
    few = [V("a", "is bad"), V("b", "is worse")]
    error = domain.errors.InvalidArgument(few)
    assert (error.message, error.metadata) == ("a: is bad; b: is worse", {"fields": "a,b"})
    assert (error.violations, error.omitted) == (few, 0)

    many = [V(f"f{i}", "is bad") for i in range(10)]
    error = domain.errors.InvalidArgument(many)
    assert domain.errors.MAX_VIOLATIONS == 8
    assert error.violations == many[:8]
    assert error.omitted == 2
    assert error.metadata == {
        "fields": ",".join(f"f{i}" for i in range(8)),
        "omittedViolations": "2",
    }
    shown = "; ".join(f"f{i}: is bad" for i in range(8))
    assert error.message == f"10 problems, the first 8: {shown}"

    # Violations counted but not passed (a caller stopped collecting) add to the rest.
    error = domain.errors.InvalidArgument(few, omitted=5)
    assert (error.omitted, error.metadata["omittedViolations"]) == (5, "5")
    assert error.message == "7 problems, the first 2: a: is bad; b: is worse"
