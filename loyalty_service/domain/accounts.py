"""Accounts: status rules and merges."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime

from .errors import AccountNotActive, InsufficientPoints, ProgramMismatch
from .programs import Tier, tier_for

MAX_CUSTOMER_LENGTH = 255


class AccountStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    CLOSED = "CLOSED"
    MERGED = "MERGED"


@dataclass(frozen=True)
class Account:
    id: str
    program: str
    customer: str | None
    status: AccountStatus
    balance: int
    lifetime_points: int
    tier: str
    metadata: dict[str, str]
    create_time: datetime
    update_time: datetime
    merged_into: str | None = None
    # One more with every change of the account, postings included: of two snapshots of
    # one account, the one with the higher version is the newer.
    version: int = 1
    # The identity of the caller that made the latest change (the version's), posting or not.
    actor: str = ""
    # The points of its HELD holds that have not expired (as of the read, or of the change
    # for a snapshot): reserved, not spendable.
    held_points: int = 0

    @property
    def available_balance(self) -> int:
        """What a debit that checks for overdraft, or a new hold, may take."""
        return self.balance - self.held_points


@dataclass(frozen=True)
class MergeResult:
    target: Account
    source: Account


def require_active(account: Account) -> None:
    if account.status is not AccountStatus.ACTIVE:
        raise not_active(account)


def not_active(account: Account) -> AccountNotActive:
    return AccountNotActive(
        f"account {account.id} is {account.status}, not ACTIVE",
        account=account.id,
        status=account.status,
    )


def insufficient_points(account: Account, requested: int) -> InsufficientPoints:
    """Fewer points available (balance less what is held) than a debit or a hold asks for."""
    return InsufficientPoints(
        f"{account.available_balance} points are available"
        f" ({account.balance} less {account.held_points} held),"
        f" fewer than the {requested} requested",
        available=account.available_balance,
        held=account.held_points,
        balance=account.balance,
        requested=requested,
    )


def check_merge(source: Account, target: Account) -> None:
    if source.program != target.program:
        raise ProgramMismatch(
            f"{source.id} is in {source.program} but {target.id} is in {target.program}",
            source=source.id,
            target=target.id,
            sourceProgram=source.program,
            targetProgram=target.program,
        )
    require_active(source)
    require_active(target)


def revised(account: Account, now: datetime, actor: str, **changes: object) -> Account:
    """The account after a change by `actor`: its update time, version and actor move on
    with it."""
    return replace(
        account,
        **changes,  # type: ignore[arg-type]
        update_time=now,
        version=account.version + 1,
        actor=actor,
    )


def merged_target(
    target: Account, source: Account, now: datetime, actor: str, tiers: list[Tier]
) -> Account:
    """The target after the merge: it holds both accounts' points, and its tier follows its
    lifetime points among its program's `tiers`."""
    lifetime_points = target.lifetime_points + source.lifetime_points
    return revised(
        target,
        now,
        actor,
        balance=target.balance + source.balance,
        # The source's HELD holds move with it: a checkout in flight still captures.
        held_points=target.held_points + source.held_points,
        lifetime_points=lifetime_points,
        tier=tier_for(target.lifetime_points, lifetime_points, tiers, target.tier)
        if source.lifetime_points
        else target.tier,  # no change of lifetime points, no change of tier
    )


def merged_source(source: Account, target: Account, now: datetime, actor: str) -> Account:
    return revised(
        source,
        now,
        actor,
        status=AccountStatus.MERGED,
        merged_into=target.id,
        balance=0,
        lifetime_points=0,
        held_points=0,
    )


@dataclass(frozen=True)
class AccountFilter:
    program: str | None = None
    customer: str | None = None
    status: AccountStatus | None = None
    # Only accounts of these programs (a caller's, when it is limited to some).
    programs: frozenset[str] | None = None
