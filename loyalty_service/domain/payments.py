"""Payments and refunds: what a payment earns, and what a refund reverses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from .accounts import Account
from .errors import CurrencyMismatch, PointsLimitExceeded, RefundExceedsPayment
from .ids import MAX_AMOUNT, new_id
from .points import Change, Direction, OriginKind, PointsTransaction, TransactionType, change
from .programs import (
    MULTIPLIER_PLACES,
    RATE_PLACES,
    EarningRule,
    Program,
    RuleTrigger,
    scaled,
    starting_tier,
    tier_for,
)

MAX_PAYMENT_ID_LENGTH = 255


# ISO 4217 currencies whose minor unit is not a hundredth; every other has 2 digits.
_MINOR_DIGITS = {
    **dict.fromkeys(
        [
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "UYI",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        ],
        0,
    ),
    **dict.fromkeys(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"], 3),
    **dict.fromkeys(["CLF", "UYW"], 4),
}


def minor_digits(currency: str) -> int:
    """How many digits the currency's minor unit has: 2 for EUR (cents), 0 for JPY."""
    return _MINOR_DIGITS.get(currency, 2)


class PaymentOutcome(enum.StrEnum):
    EARNED = "EARNED"
    GUEST = "GUEST"
    NOT_ENROLLED = "NOT_ENROLLED"
    ACCOUNT_CLOSED = "ACCOUNT_CLOSED"
    NO_POINTS = "NO_POINTS"


@dataclass(frozen=True)
class NewPayment:
    """A validated RecordPayment."""

    id: str
    program: str
    customer: str | None
    amount: int  # minor units
    currency: str
    occurred_at: datetime
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Payment:
    id: str
    program: str
    customer: str | None
    amount: int
    currency: str
    occurred_at: datetime
    metadata: dict[str, str]
    outcome: PaymentOutcome
    account: str | None
    enrolled: bool
    create_time: datetime
    actor: str = ""  # the identity of the caller that recorded it


@dataclass(frozen=True)
class PaymentResult:
    payment: Payment
    transactions: list[PointsTransaction]  # the welcome bonus if it enrolled, then the earns
    account: Account | None


@dataclass(frozen=True)
class NewRefund:
    id: str
    payment_id: str
    amount: int


@dataclass(frozen=True)
class Refund:
    id: str
    payment_id: str
    amount: int
    refunded_amount: int  # all refunds of the payment so far, this one included
    create_time: datetime
    actor: str = ""  # the identity of the caller that recorded it


@dataclass(frozen=True)
class RefundResult:
    refund: Refund
    transactions: list[PointsTransaction]
    account: Account | None


@dataclass(frozen=True)
class Earn:
    rule: EarningRule
    points: int


def check_payment_currency(program: Program, currency: str) -> None:
    if currency != program.currency:
        raise CurrencyMismatch(
            f"program {program.id} earns in {program.currency}, not {currency}",
            program=program.id,
            currency=program.currency,
            requested=currency,
        )


def _rule_points(rule: EarningRule, payment: NewPayment, tier: str) -> int:
    """amount / 10^digits x points_per_unit x the tier's multiplier, fraction dropped, then
    capped; in integers (rate in 10^-4, multiplier in 10^-2), so nothing is lost to floats."""
    rate = scaled(rule.points_per_unit, RATE_PLACES)
    multiplier: int | None = 10**MULTIPLIER_PLACES
    for entry in rule.tier_multipliers:
        if entry.tier == tier:
            multiplier = scaled(entry.multiplier, MULTIPLIER_PLACES)
    assert rate is not None and multiplier is not None, "rules are checked when saved"
    scale = 10 ** (minor_digits(payment.currency) + RATE_PLACES + MULTIPLIER_PLACES)
    points = payment.amount * rate * multiplier // scale
    return min(points, rule.max_points) if rule.max_points else points


def _applies(rule: EarningRule, payment: NewPayment) -> bool:
    return (
        rule.trigger is RuleTrigger.PAYMENT_COMPLETED
        and payment.amount >= rule.min_amount
        and (rule.start_time is None or rule.start_time <= payment.occurred_at)
        and (rule.end_time is None or payment.occurred_at < rule.end_time)
    )


def payment_earns(rules: list[EarningRule], payment: NewPayment, tier: str) -> list[Earn]:
    """What each matching payment rule earns for a member in `tier`, in rule order; all of
    them apply. Rules that earn 0 points are left out. Raises PointsLimitExceeded when one
    would credit more than a transaction may hold."""
    earns = []
    for rule in rules:
        if not _applies(rule, payment):
            continue
        points = _rule_points(rule, payment, tier)
        if points > MAX_AMOUNT:
            raise PointsLimitExceeded(
                f"rule {rule.id} would credit {points} points for payment {payment.id};"
                f" one transaction holds at most {MAX_AMOUNT}",
                rule=rule.id,
                points=points,
                limit=MAX_AMOUNT,
            )
        if points > 0:
            earns.append(Earn(rule, points))
    return earns


def welcome_earns(rules: list[EarningRule]) -> list[Earn]:
    return [Earn(r, r.points) for r in rules if r.trigger is RuleTrigger.ACCOUNT_CREATED]


def welcomed_tier(program: Program) -> str:
    """The tier a new account has once its welcome bonus is credited: what a payment that
    enrolls it earns by."""
    bonus = sum(earn.points for earn in welcome_earns(program.earning_rules))
    return tier_for(0, bonus, program.tiers, starting_tier(program))


def earn_postings(
    account_id: str,
    earns: list[Earn],
    origin: tuple[OriginKind, str],
    metadata: dict[str, str],
    now: datetime,
) -> list[tuple[PointsTransaction, Change]]:
    """The ledger rows of `earns` to credit in order to an account (their points_after filled
    in by the kernel), each with its change. An origin id "" means each earn's own rule (a
    welcome bonus is caused by its rule)."""
    return [
        (
            PointsTransaction(
                id=new_id("ptx_"),
                account=account_id,
                type=TransactionType.EARN,
                direction=Direction.CREDIT,
                amount=earn.points,
                points_after=0,
                reason=earn.rule.name,
                origin_kind=origin[0],
                origin_id=origin[1] or earn.rule.id,
                metadata=metadata,
                create_time=now,
                rule=earn.rule.id,
                rule_version=earn.rule.version,
            ),
            change(TransactionType.EARN, Direction.CREDIT, earn.points),
        )
        for earn in earns
    ]


def check_refund(payment_id: str, amount: int, refunded: int, requested: int) -> None:
    """Refunds of a payment add up to at most its amount."""
    if refunded + requested > amount:
        raise RefundExceedsPayment(
            f"payment {payment_id} of {amount} has {amount - refunded} left to refund;"
            f" {requested} requested",
            payment=payment_id,
            refundable=amount - refunded,
            requested=requested,
        )


def refund_reversals(
    earns: list[PointsTransaction], payment_amount: int, refunded_after: int
) -> list[tuple[PointsTransaction, int]]:
    """The points to reverse of each earn, so that after refunds totalling `refunded_after`
    each has had floor(earned x refunded / amount) reversed in all. Cumulative, so rounding
    never drifts: the reversals of a full refund add up to exactly what was earned. Points
    reversed by hand (ReversePointsTransaction) count as reversed already."""
    due = []
    for earn in earns:
        points = earn.amount * refunded_after // payment_amount - earn.reversed_amount
        if points > 0:
            due.append((earn, points))
    return due
