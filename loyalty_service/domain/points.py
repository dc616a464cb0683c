"""Points transactions: the change each makes, its bounds, reversals, why one was refused."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import datetime

from .accounts import Account, insufficient_points, not_active
from .errors import (
    AccountNotActive,
    AccountNotFound,
    AlreadyReversed,
    BalanceLimitExceeded,
    InsufficientPoints,
    LedgerError,
    NotReversible,
)
from .ids import MAX_BALANCE, new_id

MAX_REASON_LENGTH = 500


MAX_ORIGIN_ID_LENGTH = 255


class TransactionType(enum.StrEnum):
    EARN = "EARN"
    REDEEM = "REDEEM"
    ADJUST = "ADJUST"
    REVERSE = "REVERSE"
    EXPIRE = "EXPIRE"


class Direction(enum.StrEnum):
    CREDIT = "CREDIT"
    DEBIT = "DEBIT"

    def opposite(self) -> Direction:
        return Direction.DEBIT if self is Direction.CREDIT else Direction.CREDIT


class OriginKind(enum.StrEnum):
    MANUAL = "MANUAL"
    PAYMENT = "PAYMENT"
    REDEMPTION = "REDEMPTION"
    RULE = "RULE"
    MERGE = "MERGE"
    REFUND = "REFUND"


# The direction each type implies; ADJUST has none and must be told.
IMPLIED_DIRECTION = {
    TransactionType.EARN: Direction.CREDIT,
    TransactionType.REDEEM: Direction.DEBIT,
    TransactionType.EXPIRE: Direction.DEBIT,
}


# Credits of these types count towards lifetime points; no transaction ever lowers them.
LIFETIME_TYPES = frozenset({TransactionType.EARN, TransactionType.ADJUST})


@dataclass(frozen=True)
class PointsTransaction:
    id: str
    account: str
    type: TransactionType
    direction: Direction
    amount: int
    points_after: int
    reason: str
    origin_kind: OriginKind
    origin_id: str
    metadata: dict[str, str]
    create_time: datetime
    reverses: str | None = None
    original_account: str | None = None
    reversed_amount: int = 0
    # For an earn credited by an earning rule: the rule and its version then.
    rule: str | None = None
    rule_version: int | None = None
    # The identity of the caller that posted it.
    actor: str = ""


# The lowest balance a reversal may leave: any, as far as int64 arithmetic is concerned.
NO_FLOOR = -MAX_BALANCE


@dataclass(frozen=True)
class Change:
    """What one transaction does to an account's totals, and the bounds the balance must
    stay within. The posting kernel (store.post) applies it under the account's row lock,
    only within them, and only to an ACTIVE account (or a CLOSED one, if `closed_ok`)."""

    delta: int
    lifetime_delta: int
    min_balance: int
    max_balance: int = MAX_BALANCE
    closed_ok: bool = False


def change(
    type_: TransactionType, direction: Direction, amount: int, *, may_overdraw: bool = False
) -> Change:
    """Only reversals may overdraw: reversing points that were already spent is recorded in
    full, leaving a negative balance, because the points really were given back."""
    if direction is Direction.CREDIT:
        lifetime_delta = amount if type_ in LIFETIME_TYPES else 0
        return Change(delta=amount, lifetime_delta=lifetime_delta, min_balance=NO_FLOOR)
    return Change(delta=-amount, lifetime_delta=0, min_balance=NO_FLOOR if may_overdraw else 0)


def refusal(reason: str, account_id: str, account: Account | None, change_: Change) -> LedgerError:
    """The error for a posting the kernel refused, by the reason it gave and the account as
    it found it."""
    if reason == AccountNotFound.reason or account is None:
        return AccountNotFound(f"account {account_id} does not exist", account=account_id)
    if reason == AccountNotActive.reason:
        return not_active(account)
    if reason == BalanceLimitExceeded.reason:
        return BalanceLimitExceeded(
            f"balance {account.balance} plus {change_.delta} exceeds {change_.max_balance}",
            balance=account.balance,
            requested=change_.delta,
            limit=change_.max_balance,
        )
    if reason == InsufficientPoints.reason:
        return insufficient_points(account, -change_.delta)
    raise AssertionError(f"the kernel refused a posting for an unknown reason: {reason}")


def to_post(new: NewTransaction, now: datetime) -> PointsTransaction:
    """The ledger row `new` will be; its points_after is filled in under the account's lock."""
    return PointsTransaction(
        id=new_id("ptx_"),
        account=new.account,
        type=new.type,
        direction=new.direction,
        amount=new.amount,
        points_after=0,
        reason=new.reason,
        origin_kind=new.origin_kind,
        origin_id=new.origin_id,
        metadata=new.metadata,
        create_time=now,
    )


def as_posted(transaction: PointsTransaction) -> PointsTransaction:
    """The transaction as it was when posted: only merges change a ledger row afterwards
    (moving it to another account), and reversals (counting what they reversed)."""
    if transaction.original_account is None and transaction.reversed_amount == 0:
        return transaction  # as most are: unchanged (and a copy costs the event feed)
    return replace(
        transaction,
        account=transaction.original_account or transaction.account,
        original_account=None,
        reversed_amount=0,
    )


def reversible_amount(transaction: PointsTransaction) -> int:
    return transaction.amount - transaction.reversed_amount


def check_reversal(transaction: PointsTransaction, requested: int | None) -> int:
    """Returns the points to reverse, or raises why the reversal may not happen."""
    if transaction.type is TransactionType.REVERSE:
        raise NotReversible(
            f"{transaction.id} is itself a reversal", points_transaction=transaction.id
        )
    remaining = reversible_amount(transaction)
    amount = remaining if requested is None else requested
    if remaining == 0 or amount > remaining:
        raise AlreadyReversed(
            f"{transaction.id} has {remaining} of {transaction.amount} points left to reverse;"
            f" {amount} requested",
            points_transaction=transaction.id,
            reversible=remaining,
            requested=amount,
        )
    return amount


@dataclass(frozen=True)
class TransactionFilter:
    account: str | None = None
    type: TransactionType | None = None
    direction: Direction | None = None


@dataclass(frozen=True)
class NewTransaction:
    """A validated request to post points."""

    account: str
    type: TransactionType
    direction: Direction
    amount: int
    reason: str = ""
    origin_kind: OriginKind = OriginKind.MANUAL
    origin_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


def reversal(
    original: PointsTransaction,
    points: int,
    origin: tuple[OriginKind, str],
    reason: str,
    now: datetime,
    *,
    refund: bool,
) -> tuple[PointsTransaction, Change]:
    """The ledger row reversing `points` of `original` (its points_after filled in by the
    kernel), and its change. A reversal may take the balance below zero (points given back
    are taken back even if spent); lifetime points and tier stay. It needs an ACTIVE
    account, except a refund's, which a CLOSED account takes too: the money went back
    whatever became of the account, and the refund must not wait for a reopen that the
    customer's newer ACTIVE account would forbid."""
    direction = original.direction.opposite()
    ptx = PointsTransaction(
        id=new_id("ptx_"),
        account=original.account,
        type=TransactionType.REVERSE,
        direction=direction,
        amount=points,
        points_after=0,
        reason=reason,
        origin_kind=origin[0],
        origin_id=origin[1],
        metadata={},
        create_time=now,
        reverses=original.id,
    )
    return ptx, replace(
        change(TransactionType.REVERSE, direction, points, may_overdraw=True), closed_ok=refund
    )
