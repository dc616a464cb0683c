"""What payments earn: the currency's minor units, points per unit (4 places), the minimum
amount, the cap, tier multipliers (2 places), rule windows, several rules at once; the
payment's currency, welcome bonuses, and the ledger rows of what is earned."""

from __future__ import annotations

from datetime import timedelta, timezone
from fractions import Fraction
from math import floor

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from loyalty_service import domain
from tests.domain.builders import (
    ACCOUNT_ID,
    CREDIT,
    DAY,
    EARN,
    NOW,
    PAYMENT_ID,
    PROGRAM_ID,
    PROPERTY,
    THOROUGH,
    decimals,
    new_payment,
    payment_rule,
    program,
    rule_id,
    welcome_rule,
)

LIMIT = domain.ids.MAX_AMOUNT
ZERO_DIGITS = [
    *("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG"),
    *("RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"),
]
THREE_DIGITS = ["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"]
FOUR_DIGITS = ["CLF", "UYW"]
TWO_DIGITS = ["EUR", "USD", "GBP", "CHF", "SEK", "CNY", "INR", "MGA", "ZZZ"]
DIGITS = {
    **dict.fromkeys(ZERO_DIGITS, 0),
    **dict.fromkeys(TWO_DIGITS, 2),
    **dict.fromkeys(THREE_DIGITS, 3),
    **dict.fromkeys(FOUR_DIGITS, 4),
}


def points(
    rule: domain.programs.EarningRule, amount: int, currency: str = "EUR", tier: str = "", **fields
) -> int:
    """What one rule earns for a payment; 0 when it earns nothing."""
    earns = domain.payments.payment_earns([rule], new_payment(amount, currency, **fields), tier)
    assert len(earns) <= 1
    return earns[0].points if earns else 0


# -- the currency's minor units -----------------------------------------------------------


@pytest.mark.parametrize(("currency", "digits"), sorted(DIGITS.items()))
def test_minor_digits(currency, digits):
    assert domain.payments.minor_digits(currency) == digits


def test_the_currencies_whose_minor_unit_is_not_a_hundredth():
    """Every ISO 4217 currency with 0, 3 or 4 minor-unit digits, and no other."""
    not_two = {c: d for c, d in DIGITS.items() if d != 2}
    assert not_two == domain.payments._MINOR_DIGITS
    assert sorted(set(domain.payments._MINOR_DIGITS.values())) == [0, 3, 4]


@pytest.mark.parametrize(
    ("currency", "points_per_unit", "amount", "earned"),
    [
        ("EUR", "1", 1999, 19),
        ("EUR", "0.5", 1999, 9),
        ("EUR", "2.5", 101, 2),
        ("USD", "0.0001", 100_000_000, 100),
        ("USD", "1.0001", 1_000_000, 10_001),
        ("JPY", "1", 1999, 1999),
        ("JPY", "0.01", 1999, 19),
        ("BHD", "1", 1999, 1),
        ("KWD", "1000", 1999, 1999),
        ("EUR", "1", 4250, 42),
        ("EUR", "0.1", 1000, 1),
        ("EUR", "0.1", 999, 0),
        ("EUR", "1", 99, 0),  # rounds down to nothing
        ("EUR", "1", 100, 1),
        ("EUR", "3.3333", 300, 9),  # 9.9999
        ("EUR", "1000000", 100, 1_000_000),
        ("EUR", "0.0001", 10**15, LIMIT),
        ("JPY", "0.0001", 9999, 0),
        ("JPY", "0.0001", 10_000, 1),
        ("KRW", "1.5", 3, 4),
        ("ISK", "1000000", 1000, LIMIT),
        ("OMR", "0.001", 1_000_000, 1),
        ("TND", "3.3333", 3000, 9),
        ("KWD", "1", 999, 0),
        ("CLF", "1", 9999, 0),
        ("CLF", "1", 10_000, 1),
        ("CLF", "2.5", 12_345, 3),  # 1.2345 x 2.5 = 3.08625
        ("UYW", "1000000", 1, 100),
    ],
)
def test_points_follow_the_currency_minor_units(currency, points_per_unit, amount, earned):
    rule = payment_rule(points_per_unit)
    expected = [domain.payments.Earn(rule, earned)] if earned else []
    assert domain.payments.payment_earns([rule], new_payment(amount, currency), "") == expected


# -- decimals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "places", "expected"),
    [
        ("1", 4, 10_000),
        ("1.5", 4, 15_000),
        ("1.50", 4, 15_000),
        ("1.5000", 4, 15_000),
        ("0.0001", 4, 1),
        ("1.0001", 4, 10_001),
        ("1000000", 4, 10_000_000_000),
        ("0", 4, 0),
        ("007.50", 2, 750),
        ("2.0", 2, 200),
        ("0.01", 2, 1),
        ("100", 2, 10_000),
        ("5", 0, 5),
        ("999999999999", 0, 999_999_999_999),  # 12 digits: the most
        ("999999999999.99", 2, 99_999_999_999_999),
        # Not plain decimals, or too many places.
        ("1.23456", 4, None),
        ("0.00001", 4, None),
        ("1.234", 2, None),
        ("1.0", 0, None),
        ("1000000000000", 0, None),
        ("", 4, None),
        ("abc", 4, None),
        ("-1", 4, None),
        ("+1", 4, None),
        ("1.", 4, None),
        (".5", 4, None),
        ("1,5", 4, None),
        ("1e3", 4, None),
        (" 1", 4, None),
        ("1 ", 4, None),
        ("1\n", 4, None),
        ("1.2.3", 4, None),
        ("\u0661", 4, None),  # ARABIC-INDIC DIGIT ONE: a digit, not a plain one
    ],
)
def test_scaled(text, places, expected):
    assert domain.programs.scaled(text, places) == expected


@given(value=decimals(4, 0, 10**12 * 10**4 - 1))
@PROPERTY
def test_scaled_is_exact(value):
    """A decimal with up to 4 places is read as exactly its value, in 10^-4."""
    text, exact = value
    assert domain.programs.scaled(text, 4) == exact * 10**4


# -- points per unit, the minimum, the cap ------------------------------------------------


@pytest.mark.parametrize(
    ("min_amount", "amount", "earned"),
    [
        (500, 499, 0),
        (500, 500, 5),
        (500, 501, 5),
        (1000, 999, 0),
        (0, 100, 1),
        (0, 1, 0),
        (1, 1, 0),
        (10**11, 10**11 - 1, 0),
        (10**11, 10**11, LIMIT),
    ],
)
def test_min_amount(min_amount, amount, earned):
    assert points(payment_rule("1", min_amount=min_amount), amount) == earned


def test_min_amount_is_in_minor_units_of_any_currency():
    rule = payment_rule("1", min_amount=500)
    assert points(rule, 499, "JPY") == 0
    assert points(rule, 500, "JPY") == 500
    assert points(rule, 500, "KWD") == 0


@pytest.mark.parametrize(
    ("points_per_unit", "max_points", "amount", "earned"),
    [
        ("1", 30, 500, 5),
        ("1", 30, 1_000_000, 30),
        ("1", 30, 2999, 29),
        ("1", 30, 3000, 30),
        ("1", 30, 3099, 30),
        ("1", 1, 100, 1),
        ("1", 1, 99, 0),
        ("1", 0, 10**11, LIMIT),  # 0: no cap
        ("1", LIMIT, 10**15, LIMIT),
        # A cap keeps a rule within what a transaction holds.
        ("1000000", 5, 10**13, 5),
        ("1000000", LIMIT, 10**15, LIMIT),
    ],
)
def test_max_points(points_per_unit, max_points, amount, earned):
    rule = payment_rule(points_per_unit, max_points=max_points)
    assert points(rule, amount) == earned


def test_min_amount_and_max_points():
    rule = payment_rule("1", min_amount=500, max_points=30)
    payments = [499, 500, 1_000_000]
    assert [points(rule, amount) for amount in payments] == [0, 5, 30]


# -- tier multipliers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "multipliers", "points_per_unit", "amount", "earned"),
    [
        ("Silver", {"Silver": "2"}, "1", 1000, 20),
        ("", {"Silver": "2"}, "1", 15_000, 150),  # no tier: 1x
        ("Gold", {"Silver": "2"}, "1", 1000, 10),  # another tier: 1x
        ("silver", {"Silver": "2"}, "1", 1000, 10),  # names match exactly
        ("Gold", {"Silver": "2", "Gold": "3"}, "1", 1000, 30),
        # 9.99 x 1.5 = 14.985 -> 14 (not floor(9.99) x 1.5 = 13.5 -> 13).
        ("Silver", {"Silver": "1.5"}, "1", 999, 14),
        ("Silver", {"Silver": "1.50"}, "1", 999, 14),
        # 3.33 x 1.5 x 1.5 = 7.4925 -> 7 (not floor(3.33 x 1.5) x 1.5 = 6).
        ("Silver", {"Silver": "1.5"}, "1.5", 333, 7),
        ("Silver", {"Silver": "1.05"}, "1", 1000, 10),  # 10.5
        ("Silver", {"Silver": "2.25"}, "0.5", 1000, 11),  # 11.25
        ("Silver", {"Silver": "3"}, "1", 50, 1),  # 0.5 x 3 = 1.5
        ("Bronze", {"Silver": "3"}, "1", 50, 0),
        ("Silver", {"Silver": "0.01"}, "1", 1000, 0),  # 0.1
        ("Silver", {"Silver": "0.01"}, "1", 10_000, 1),
        ("Silver", {"Silver": "100"}, "1", 100, 100),
        ("Silver", {"Silver": "100"}, "0.0001", 10**13, 10**9),
        ("Silver", {"Silver": "1.5"}, "1", 5, 0),  # 0.075
        ("Silver", {"Silver": "2"}, "1", 1999, 39),  # 39.98
    ],
)
def test_tier_multipliers(tier, multipliers, points_per_unit, amount, earned):
    rule = payment_rule(points_per_unit, multipliers=multipliers)
    assert points(rule, amount, tier=tier) == earned


def test_a_multiplier_in_other_minor_units():
    rule = payment_rule("1", multipliers={"Silver": "1.5"})
    assert points(rule, 1999, "JPY", tier="Silver") == 2998  # 2998.5
    assert points(rule, 1999, "KWD", tier="Silver") == 2  # 2.9985


def test_a_fractional_multiplier_drops_the_fraction_once_and_the_cap_follows_it():
    rules = [
        payment_rule("1", multipliers={"Silver": "1.5"}, number=1),
        payment_rule("1", max_points=20, multipliers={"Silver": "1.5"}, number=2),
    ]

    def earned(amount: int, tier: str) -> list[int]:
        return [e.points for e in domain.payments.payment_earns(rules, new_payment(amount), tier)]

    assert earned(999, "Silver") == [14, 14]
    assert earned(2000, "Silver") == [30, 20]  # 30 by the first, capped at 20
    assert earned(2000, "") == [20, 20]


def test_the_multiplier_applies_from_the_tier_the_payment_is_recorded_at():
    rule = payment_rule("1", multipliers={"Silver": "2"})
    # Crossing into Silver earns at 1x; the next payment at 2x.
    assert points(rule, 15_000, tier="") == 150
    assert points(rule, 1000, tier="Silver") == 20


# -- windows ------------------------------------------------------------------------------

START, END = DAY - timedelta(days=1), DAY + timedelta(days=1)


@pytest.mark.parametrize(
    ("start", "end", "occurred_at", "applies"),
    [
        (START, END, DAY, True),
        (START, END, START, True),  # the start is in
        (START, END, END - timedelta(microseconds=1), True),
        (START, END, END, False),  # the end is out
        (START, END, START - timedelta(microseconds=1), False),
        (START, END, START - timedelta(seconds=1), False),
        (START, END, DAY + timedelta(days=30), False),
        (DAY + timedelta(days=1), None, DAY, False),
        (DAY + timedelta(days=1), None, DAY + timedelta(days=1), True),
        (DAY + timedelta(days=1), None, DAY + timedelta(days=10**5), True),
        (None, DAY, DAY, False),
        (None, DAY, DAY - timedelta(microseconds=1), True),
        (None, DAY, DAY - timedelta(days=10**5), True),
        (None, None, DAY, True),
        # Instants, whatever the offset they are written with.
        (DAY, END, DAY.astimezone(timezone(timedelta(hours=2))), True),
        (START, DAY, DAY.astimezone(timezone(timedelta(hours=-5))), False),
    ],
)
def test_windows(start, end, occurred_at, applies):
    rule = payment_rule("1", start_time=start, end_time=end)
    assert points(rule, 1000, occurred_at=occurred_at) == (10 if applies else 0)


def test_a_payment_outside_every_window_earns_nothing():
    rules = [
        payment_rule("1", start_time=DAY + timedelta(days=1), number=1),
        payment_rule("1", end_time=DAY, number=2),
    ]
    assert domain.payments.payment_earns(rules, new_payment(1000), "") == []


# -- several rules ------------------------------------------------------------------------


def test_every_matching_rule_applies_in_the_program_order():
    promo = payment_rule("2", name="Promo", start_time=START, end_time=END, number=1)
    base = payment_rule("1", name="Base", number=2)

    def applied(moment) -> list[tuple[domain.programs.EarningRule, int]]:
        earns = domain.payments.payment_earns(
            [promo, base], new_payment(1000, occurred_at=moment), ""
        )
        return [(e.rule, e.points) for e in earns]

    assert applied(DAY) == [(promo, 20), (base, 10)]
    assert applied(START) == [(promo, 20), (base, 10)]
    assert applied(END - timedelta(microseconds=1)) == [(promo, 20), (base, 10)]
    assert applied(END) == [(base, 10)]
    assert applied(START - timedelta(seconds=1)) == [(base, 10)]
    assert applied(DAY + timedelta(days=30)) == [(base, 10)]
    reordered = domain.payments.payment_earns([base, promo], new_payment(1000), "")
    assert [(e.rule, e.points) for e in reordered] == [(base, 10), (promo, 20)]


@pytest.mark.parametrize(
    ("rates", "amount", "earned"),
    [
        (["1", "2"], 1000, [(0, 10), (1, 20)]),
        (["1", "2"], 999, [(0, 9), (1, 19)]),
        (["1", "3", "0.5"], 1000, [(0, 10), (1, 30), (2, 5)]),
        (["3", "1"], 1000, [(0, 30), (1, 10)]),
        # A rule that earns 0 points is left out; the others still apply.
        (["1", "0.0001", "2"], 1000, [(0, 10), (2, 20)]),
        (["0.5", "1"], 100, [(1, 1)]),
        (["0.5", "0.5"], 100, []),
    ],
)
def test_several_rules(rates, amount, earned):
    rules = [payment_rule(rate, number=i) for i, rate in enumerate(rates)]
    earns = domain.payments.payment_earns(rules, new_payment(amount), "")
    assert earns == [domain.payments.Earn(rules[i], p) for i, p in earned]
    assert all(e.rule is rules[i] for e, (i, _) in zip(earns, earned, strict=True))


def test_welcome_rules_earn_nothing_from_payments():
    rules = [welcome_rule(100, number=1), payment_rule("1", number=2), welcome_rule(40, number=3)]
    assert domain.payments.payment_earns(rules, new_payment(1000), "") == [
        domain.payments.Earn(rules[1], 10)
    ]
    assert domain.payments.payment_earns([welcome_rule(5)], new_payment(10**6), "") == []
    assert domain.payments.payment_earns([], new_payment(10**6), "") == []


# -- the points limit ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("points_per_unit", "amount", "credited"),
    [
        ("1000000", 10**13, 10**17),
        ("1", (LIMIT + 1) * 100, LIMIT + 1),
        ("1000000", 10**15, 10**19),
        ("0.0001", 10**15, None),  # exactly the limit
        ("1", LIMIT * 100 + 99, None),
    ],
)
def test_points_limit(points_per_unit, amount, credited):
    rule = payment_rule(points_per_unit, number=7)
    payment = new_payment(amount)
    if credited is None:
        assert domain.payments.payment_earns([rule], payment, "") == [
            domain.payments.Earn(rule, LIMIT)
        ]
        return
    with pytest.raises(domain.errors.PointsLimitExceeded) as caught:
        domain.payments.payment_earns([rule], payment, "")
    assert caught.value.reason == "POINTS_LIMIT_EXCEEDED"
    assert caught.value.metadata == {
        "rule": rule_id(7),
        "points": str(credited),
        "limit": str(LIMIT),
    }
    assert caught.value.message == (
        f"rule {rule_id(7)} would credit {credited} points for payment {PAYMENT_ID};"
        f" one transaction holds at most {LIMIT}"
    )


def test_one_rule_over_the_limit_fails_the_payment_and_rules_that_do_not_apply_do_not():
    fine, over = payment_rule("0.0001", number=1), payment_rule("1000000", number=2)
    with pytest.raises(domain.errors.PointsLimitExceeded) as caught:
        domain.payments.payment_earns([fine, over], new_payment(10**13), "")
    assert caught.value.metadata["rule"] == rule_id(2)
    later = payment_rule("1000000", start_time=END, number=3)
    assert domain.payments.payment_earns([fine, later], new_payment(10**13), "") == [
        domain.payments.Earn(fine, 10**7)
    ]


# -- the payment's currency ---------------------------------------------------------------


@pytest.mark.parametrize(("currency", "paid"), [("EUR", "EUR"), ("JPY", "JPY")])
def test_a_payment_in_the_program_currency(currency, paid):
    assert domain.payments.check_payment_currency(program(currency=currency), paid) is None


@pytest.mark.parametrize(("currency", "paid"), [("EUR", "USD"), ("EUR", "eur"), ("JPY", "EUR")])
def test_a_payment_in_another_currency(currency, paid):
    with pytest.raises(domain.errors.CurrencyMismatch) as caught:
        domain.payments.check_payment_currency(program(currency=currency), paid)
    assert caught.value.reason == "CURRENCY_MISMATCH"
    assert caught.value.metadata == {"program": PROGRAM_ID, "currency": currency, "requested": paid}
    assert caught.value.message == f"program {PROGRAM_ID} earns in {currency}, not {paid}"


# -- welcome bonuses and the ledger rows of earns -----------------------------------------


def test_welcome_earns():
    first, base, second = welcome_rule(100, number=1), payment_rule("1"), welcome_rule(40, number=3)
    assert domain.payments.welcome_earns([first, base, second]) == [
        domain.payments.Earn(first, 100),
        domain.payments.Earn(second, 40),
    ]
    assert domain.payments.welcome_earns([base]) == []
    assert domain.payments.welcome_earns([]) == []


def test_earn_postings():
    promo = payment_rule("2", name="Promo", number=1)
    base = payment_rule("1", name="Base", number=2, version=3)
    earns = domain.payments.payment_earns([promo, base], new_payment(1000), "")
    metadata = {"store": "42"}
    postings = domain.payments.earn_postings(
        ACCOUNT_ID, earns, (domain.points.OriginKind.PAYMENT, PAYMENT_ID), metadata, NOW
    )
    assert [change for _, change in postings] == [
        domain.points.Change(20, 20, domain.points.NO_FLOOR),
        domain.points.Change(10, 10, domain.points.NO_FLOOR),
    ]
    assert all(not change.closed_ok for _, change in postings)
    rows = [row for row, _ in postings]
    assert all(domain.ids.TRANSACTION_ID.fullmatch(row.id) for row in rows)
    assert len({row.id for row in rows}) == 2
    expected = [
        (promo, 20, "Promo", 1),
        (base, 10, "Base", 3),
    ]
    for row, (rule, amount, reason, version) in zip(rows, expected, strict=True):
        assert row == domain.points.PointsTransaction(
            id=row.id,
            account=ACCOUNT_ID,
            type=EARN,
            direction=CREDIT,
            amount=amount,
            points_after=0,  # the posting fills it in
            reason=reason,
            origin_kind=domain.points.OriginKind.PAYMENT,
            origin_id=PAYMENT_ID,
            metadata=metadata,
            create_time=NOW,
            rule=rule.id,
            rule_version=version,
        )


def test_welcome_postings_are_caused_by_their_rules():
    first, second = welcome_rule(100, number=1), welcome_rule(40, number=2)
    earns = domain.payments.welcome_earns([first, second])
    postings = domain.payments.earn_postings(
        ACCOUNT_ID, earns, (domain.points.OriginKind.RULE, ""), {}, NOW
    )
    assert [(row.origin_kind, row.origin_id, row.amount) for row, _ in postings] == [
        (domain.points.OriginKind.RULE, first.id, 100),
        (domain.points.OriginKind.RULE, second.id, 40),
    ]
    assert [change.delta for _, change in postings] == [100, 40]
    assert (
        domain.payments.earn_postings(ACCOUNT_ID, [], (domain.points.OriginKind.RULE, ""), {}, NOW)
        == []
    )


# -- properties ---------------------------------------------------------------------------

currencies = st.sampled_from(sorted(DIGITS))
rates = decimals(
    domain.programs.RATE_PLACES,
    1,
    domain.programs.MAX_POINTS_PER_UNIT * 10**domain.programs.RATE_PLACES,
)
multipliers = decimals(domain.programs.MULTIPLIER_PLACES, 1, domain.programs.MAX_MULTIPLIER * 100)
amounts = st.integers(1, domain.programs.MAX_PAYMENT_AMOUNT)
# Amounts spread over every order of magnitude, not only the largest.
spread_amounts = st.integers(0, 15).flatmap(lambda e: st.integers(1, max(1, 10**e)))
caps = st.one_of(st.just(0), st.integers(1, LIMIT))


def exact_points(amount: int, digits: int, rate: Fraction, multiplier: Fraction, cap: int):
    uncapped = floor(Fraction(amount, 10**digits) * rate * multiplier)
    return min(uncapped, cap) if cap else uncapped


@given(
    currency=currencies,
    rate=rates,
    multiplier=st.one_of(st.none(), multipliers),
    amount=st.one_of(amounts, spread_amounts),
    cap=caps,
)
@THOROUGH
def test_points_are_the_exact_product_rounded_down_then_capped(
    currency, rate, multiplier, amount, cap
):
    """For every minor-unit digit count, a rule earns floor(amount / 10^digits x rate x
    multiplier), computed with exact fractions, then capped by max_points (0: no cap); no
    earn when that is 0, and PointsLimitExceeded when it is above what a transaction holds.
    A member without a multiplier for its tier earns at 1x."""
    multipliers_ = {"Gold": multiplier[0]} if multiplier else {}
    rule = payment_rule(rate[0], multipliers=multipliers_, max_points=cap)
    factor = multiplier[1] if multiplier else Fraction(1)
    expected = exact_points(amount, DIGITS[currency], rate[1], factor, cap)
    payment = new_payment(amount, currency)
    if expected > LIMIT:
        with pytest.raises(domain.errors.PointsLimitExceeded) as caught:
            domain.payments.payment_earns([rule], payment, "Gold")
        assert caught.value.metadata["points"] == str(expected)
        return
    earns = domain.payments.payment_earns([rule], payment, "Gold")
    assert earns == ([domain.payments.Earn(rule, expected)] if expected else [])


@given(
    rules=st.lists(
        st.tuples(rates, st.integers(1, 10**6), st.one_of(st.none(), multipliers)),
        min_size=1,
        max_size=5,
    ),
    currency=currencies,
    amount=st.one_of(amounts, spread_amounts),
)
@THOROUGH
def test_caps_are_never_exceeded(rules, currency, amount):
    """Every earn of a capped rule is at most its max_points, whatever the amount, rate and
    multiplier; a capped rule never raises PointsLimitExceeded, and earns in rule order."""
    saved = [
        payment_rule(rate[0], max_points=cap, multipliers={"Gold": m[0]} if m else {}, number=i)
        for i, (rate, cap, m) in enumerate(rules)
    ]
    earns = domain.payments.payment_earns(saved, new_payment(amount, currency), "Gold")
    numbers = [saved.index(e.rule) for e in earns]
    assert numbers == sorted(numbers)
    for e in earns:
        assert 0 < e.points <= e.rule.max_points


@given(
    currency=currencies,
    rate=rates,
    low=multipliers,
    high=multipliers,
    amount=st.one_of(amounts, spread_amounts),
    cap=caps,
)
@THOROUGH
def test_a_higher_multiplier_never_earns_fewer_points(currency, rate, low, high, amount, cap):
    """Of two multipliers, the higher never earns fewer points for the same payment (and
    reaches the points limit whenever the lower does)."""
    assume(low[1] != high[1])
    if low[1] > high[1]:
        low, high = high, low
    rule = payment_rule(rate[0], multipliers={"Low": low[0], "High": high[0]}, max_points=cap)
    payment = new_payment(amount, currency)

    def earned(tier: str) -> int | None:
        try:
            earns = domain.payments.payment_earns([rule], payment, tier)
        except domain.errors.PointsLimitExceeded:
            return None
        return earns[0].points if earns else 0

    at_low, at_high = earned("Low"), earned("High")
    if at_low is None:
        assert at_high is None
    elif at_high is not None:
        assert at_high >= at_low


@given(currency=currencies, rate=rates, cap=caps, first=spread_amounts, second=spread_amounts)
@PROPERTY
def test_a_larger_payment_never_earns_fewer_points(currency, rate, cap, first, second):
    """Points never fall as the amount grows (under the points limit)."""
    smaller, larger = sorted((first, second))
    rule = payment_rule(rate[0], max_points=cap or LIMIT)
    assert points(rule, smaller, currency) <= points(rule, larger, currency)


@given(
    start=st.one_of(st.none(), st.integers(-1000, 1000)),
    length=st.integers(1, 1000),
    open_end=st.booleans(),
    at=st.integers(-2000, 2000),
)
@PROPERTY
def test_a_window_holds_from_its_start_to_just_before_its_end(start, length, open_end, at):
    """A rule applies to a payment exactly when start <= occurred_at < end (either bound
    may be unset)."""
    second = timedelta(seconds=1)
    start_time = None if start is None else DAY + start * second
    end_time = None if open_end else DAY + ((start or 0) + length) * second
    occurred_at = DAY + at * second
    rule = payment_rule("1", start_time=start_time, end_time=end_time)
    inside = (start_time is None or start_time <= occurred_at) and (
        end_time is None or occurred_at < end_time
    )
    assert points(rule, 100, occurred_at=occurred_at) == (1 if inside else 0)
