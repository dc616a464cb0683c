"""Holds: points reserved at checkout's authorisation, then captured, released or timed out.

The rules that need the account's lock (the available balance, expiry at the instant,
capture once) are applied by the store's hold functions (migration 0011); this module
says what a request may ask for, what a capture posts, and what each refusal means.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from .accounts import Account, insufficient_points
from .accounts import not_active as account_not_active
from .errors import (
    AccountNotActive,
    AccountNotFound,
    CaptureExceedsHold,
    FieldViolation,
    HoldNotActive,
    HoldNotFound,
    InsufficientPoints,
    InvalidArgument,
    LedgerError,
)
from .ids import new_id
from .points import Change, Direction, OriginKind, PointsTransaction, TransactionType

MAX_REFERENCE_LENGTH = 255


class HoldStatus(enum.StrEnum):
    HELD = "HELD"
    CAPTURED = "CAPTURED"
    RELEASED = "RELEASED"
    # Its time ran out (now >= expire_time) before it was captured or released.
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class Hold:
    id: str  # `hold_` + 20 letters and digits
    account: str  # the account holding it now (after a merge, the survivor)
    original_account: str | None  # set by a merge: where it was made
    program: str
    reference: str
    amount: int
    captured_amount: int
    status: HoldStatus  # as of the read: a HELD hold whose time is up is EXPIRED
    reason: str
    metadata: dict[str, str]
    create_time: datetime
    expire_time: datetime
    capture_time: datetime | None
    release_time: datetime | None
    capture_transaction: str | None  # the capture's REDEEM
    account_version: int  # the account's version after the hold's latest change
    actor: str  # who created it
    captured_by: str | None
    released_by: str | None


@dataclass(frozen=True)
class NewHold:
    """A validated request for a hold."""

    account: str
    amount: int
    reference: str
    reason: str
    metadata: dict[str, str]
    ttl_seconds: int | None  # None: the program's default


@dataclass(frozen=True)
class HoldFilter:
    account: str | None = None


def capture_posting(hold_id: str, now: datetime, actor: str) -> tuple[PointsTransaction, Change]:
    """A capture's REDEEM, but for what the hold's row gives it under its lock (account,
    amount, reason, metadata: SQL finish_hold): origin REDEMPTION, the hold's id."""
    ptx = PointsTransaction(
        id=new_id("ptx_"),
        account="",
        type=TransactionType.REDEEM,
        direction=Direction.DEBIT,
        amount=0,
        points_after=0,
        reason="",
        origin_kind=OriginKind.REDEMPTION,
        origin_id=hold_id,
        metadata={},
        create_time=now,
        actor=actor,
    )
    return ptx, Change(delta=0, lifetime_delta=0, min_balance=0)


def hold_not_found(hold_id: str) -> HoldNotFound:
    return HoldNotFound(f"hold {hold_id} does not exist", hold=hold_id)


def not_active(hold: Hold) -> HoldNotActive:
    return HoldNotActive(
        f"hold {hold.id} is {hold.status}, not HELD", hold=hold.id, status=hold.status
    )


def creation_refusal(
    reason: str, new: NewHold, account: Account | None, max_ttl_seconds: int | None
) -> LedgerError:
    """The error for a hold the store refused to create, by the reason it gave."""
    if reason == AccountNotFound.reason or (account is None and max_ttl_seconds is None):
        return AccountNotFound(f"account {new.account} does not exist", account=new.account)
    if reason == "TTL_EXCEEDS_MAXIMUM" and max_ttl_seconds is not None:
        maximum = f"must be at most the program's max_ttl, {max_ttl_seconds} s"
        return InvalidArgument([FieldViolation("ttl", maximum)])
    assert account is not None
    if reason == AccountNotActive.reason:
        return account_not_active(account)
    if reason == InsufficientPoints.reason:
        return insufficient_points(account, new.amount)
    raise AssertionError(f"the store refused a hold for an unknown reason: {reason}")


def finish_refusal(
    reason: str, hold_id: str, hold: Hold | None, account: Account | None, requested: int | None
) -> LedgerError:
    """The error for a capture or release the store refused, by the reason it gave, with
    the hold and the account as it found them."""
    if reason == HoldNotFound.reason or hold is None:
        return hold_not_found(hold_id)
    if reason == HoldNotActive.reason:
        return not_active(hold)
    points = hold.amount if requested is None else requested
    if reason == CaptureExceedsHold.reason:
        return CaptureExceedsHold(
            f"hold {hold.id} holds {hold.amount} points, fewer than the {points} to capture",
            hold=hold.id,
            held=hold.amount,
            requested=points,
        )
    assert account is not None
    if reason == InsufficientPoints.reason:
        return insufficient_points(account, points)
    if reason == AccountNotActive.reason:
        return account_not_active(account)
    raise AssertionError(f"the store refused a capture for an unknown reason: {reason}")
