"""Domain objects for the tests of the ledger's rules, with defaults a test overrides."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from fractions import Fraction

from hypothesis import settings
from hypothesis import strategies as st

from loyalty_service import domain

NOW = datetime(2026, 1, 1, tzinfo=UTC)
# When payments happen: a fixed day, so rule windows can be set around it.
DAY = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PROGRAM_ID = "prog_default"
ACCOUNT_ID = "loy_" + "a" * 20
OTHER_ACCOUNT_ID = "loy_" + "b" * 20
TRANSACTION_ID = "ptx_" + "a" * 20
PAYMENT_ID = "pay_1"

# Properties run without an example database, so a run leaves no files behind. THOROUGH is
# for the ledger's arithmetic (points, caps, multipliers, refunds, tier ranks), PROPERTY
# for the rest: together they keep the directory to seconds.
PROPERTY = settings(max_examples=100, deadline=None, database=None)
THOROUGH = settings(max_examples=200, deadline=None, database=None)

EARN = domain.points.TransactionType.EARN
REDEEM = domain.points.TransactionType.REDEEM
ADJUST = domain.points.TransactionType.ADJUST
REVERSE = domain.points.TransactionType.REVERSE
EXPIRE = domain.points.TransactionType.EXPIRE
CREDIT = domain.points.Direction.CREDIT
DEBIT = domain.points.Direction.DEBIT
ACTIVE = domain.accounts.AccountStatus.ACTIVE
CLOSED = domain.accounts.AccountStatus.CLOSED
MERGED = domain.accounts.AccountStatus.MERGED


def account(**changes: object) -> domain.accounts.Account:
    """An ACTIVE account with 100 points and 150 lifetime points, at version 1."""
    base = domain.accounts.Account(
        id=ACCOUNT_ID,
        program=PROGRAM_ID,
        customer="cust_1",
        status=ACTIVE,
        balance=100,
        lifetime_points=150,
        tier="",
        metadata={},
        create_time=NOW,
        update_time=NOW,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


ACCOUNT = account()


def transaction(
    type_: domain.points.TransactionType = EARN,
    direction: domain.points.Direction = CREDIT,
    amount: int = 10,
    reversed_amount: int = 0,
    **changes: object,
) -> domain.points.PointsTransaction:
    """A posted transaction of ACCOUNT."""
    base = domain.points.PointsTransaction(
        id=TRANSACTION_ID,
        account=ACCOUNT_ID,
        type=type_,
        direction=direction,
        amount=amount,
        points_after=0,
        reason="",
        origin_kind=domain.points.OriginKind.MANUAL,
        origin_id="",
        metadata={},
        create_time=NOW,
        reversed_amount=reversed_amount,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def earn(amount: int, reversed_amount: int = 0, number: int = 1) -> domain.points.PointsTransaction:
    """An EARN a payment credited, of which `reversed_amount` was reversed already."""
    return transaction(
        EARN,
        CREDIT,
        amount,
        reversed_amount,
        id=f"ptx_{number:020d}",
        origin_kind=domain.points.OriginKind.PAYMENT,
        origin_id=PAYMENT_ID,
    )


def rule_id(number: int) -> str:
    return f"rule_{number:020d}"


def payment_rule(
    points_per_unit: str = "1",
    *,
    multipliers: dict[str, str] | None = None,
    number: int = 1,
    **fields: object,
) -> domain.programs.EarningRule:
    """A saved payment rule, at version 1; `multipliers` maps tiers to multipliers."""
    rule = domain.programs.EarningRule(
        trigger=domain.programs.RuleTrigger.PAYMENT_COMPLETED,
        points_per_unit=points_per_unit,
        tier_multipliers=[
            domain.programs.TierMultiplier(t, m) for t, m in (multipliers or {}).items()
        ],
        id=rule_id(number),
        version=1,
    )
    return replace(rule, **fields)  # type: ignore[arg-type]


def welcome_rule(points: int, *, number: int = 1, **fields: object) -> domain.programs.EarningRule:
    """A saved welcome-bonus rule, at version 1."""
    rule = domain.programs.EarningRule(
        trigger=domain.programs.RuleTrigger.ACCOUNT_CREATED,
        points=points,
        id=rule_id(number),
        version=1,
    )
    return replace(rule, **fields)  # type: ignore[arg-type]


def new_payment(
    amount: int, currency: str = "EUR", occurred_at: datetime = DAY, **fields: object
) -> domain.payments.NewPayment:
    """A member's payment, recorded as PAYMENT_ID."""
    payment = domain.payments.NewPayment(
        id=PAYMENT_ID,
        program=PROGRAM_ID,
        customer="cust_1",
        amount=amount,
        currency=currency,
        occurred_at=occurred_at,
    )
    return replace(payment, **fields)  # type: ignore[arg-type]


def tiers(*thresholds: tuple[str, int]) -> list[domain.programs.Tier]:
    return [domain.programs.Tier(name, points) for name, points in thresholds]


def program(
    tiers: list[domain.programs.Tier] | None = None,
    rules: list[domain.programs.EarningRule] | None = None,
    currency: str = "EUR",
    **changes: object,
) -> domain.programs.Program:
    base = domain.programs.Program(
        id=PROGRAM_ID,
        name="Rules",
        currency=currency,
        auto_enroll=False,
        tiers=tiers or [],
        status=domain.programs.ProgramStatus.ACTIVE,
        create_time=NOW,
        update_time=NOW,
        earning_rules=rules or [],
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def spelled(value: int, places: int, zeros: int = 0, leading: int = 0) -> str:
    """`value` (a count of 10^-places) as a decimal string: its fraction with up to `zeros`
    trailing zeros more (as far as `places` allows), its whole part with `leading` zeros."""
    whole, fraction = divmod(value, 10**places)
    digits = str(fraction).rjust(places, "0").rstrip("0") if places else ""
    digits += "0" * min(zeros, places - len(digits))
    whole_text = "0" * leading + str(whole)
    return f"{whole_text}.{digits}" if digits else whole_text


@st.composite
def decimals(draw: st.DrawFn, places: int, low: int, high: int) -> tuple[str, Fraction]:
    """A decimal string with at most `places` places, of a value from low to high (counts of
    10^-places), spelled with or without trailing zeros; and its exact value."""
    value = draw(st.integers(low, high))
    return spelled(value, places, draw(st.integers(0, places))), Fraction(value, 10**places)
