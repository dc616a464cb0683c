"""Programs, accounts, points transactions and the rules of the ledger; standard library
only."""

from __future__ import annotations

import enum
import re
import secrets
import string
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Generic, TypeVar

T = TypeVar("T")

MAX_AMOUNT = 1_000_000_000
# Far below the int64 limit, so that no sum of balances can overflow.
MAX_BALANCE = 1_000_000_000_000_000
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_LENGTH = 40
MAX_METADATA_VALUE_LENGTH = 500
MAX_REASON_LENGTH = 500
MAX_CUSTOMER_LENGTH = 255
MAX_ORIGIN_ID_LENGTH = 255
MAX_REQUEST_ID_LENGTH = 100

_ID_ALPHABET = string.ascii_letters + string.digits
_ID_LENGTH = 20
ACCOUNT_ID = re.compile(r"^loy_[A-Za-z0-9]{20}$")
TRANSACTION_ID = re.compile(r"^ptx_[A-Za-z0-9]{20}$")
PROGRAM_ID = re.compile(r"^prog_[A-Za-z0-9_]{1,60}$")
CURRENCY = re.compile(r"^[A-Z]{3}$")  # ISO 4217
MAX_PROGRAM_NAME_LENGTH = 200
MAX_TIERS = 20
MAX_TIER_NAME_LENGTH = 40


def new_id(prefix: str) -> str:
    """`prefix` and 20 random letters and digits (about 119 bits)."""
    number = int.from_bytes(secrets.token_bytes(16))
    letters = []
    for _ in range(_ID_LENGTH):
        number, digit = divmod(number, len(_ID_ALPHABET))
        letters.append(_ID_ALPHABET[digit])
    return prefix + "".join(letters)


class ProgramStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    ARCHIVED = "ARCHIVED"


class AccountStatus(enum.StrEnum):
    ACTIVE = "ACTIVE"
    CLOSED = "CLOSED"
    MERGED = "MERGED"


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


# The direction each type implies; ADJUST has none and must be told.
IMPLIED_DIRECTION = {
    TransactionType.EARN: Direction.CREDIT,
    TransactionType.REDEEM: Direction.DEBIT,
    TransactionType.EXPIRE: Direction.DEBIT,
}
# Credits of these types count towards lifetime points; no transaction ever lowers them.
LIFETIME_TYPES = frozenset({TransactionType.EARN, TransactionType.ADJUST})


@dataclass(frozen=True)
class Tier:
    name: str
    # The lifetime points from which a member is in this tier.
    lifetime_points: int


@dataclass(frozen=True)
class Program:
    id: str
    name: str
    currency: str
    auto_enroll: bool
    tiers: list[Tier]  # in order of threshold
    status: ProgramStatus
    create_time: datetime
    update_time: datetime


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


@dataclass(frozen=True)
class MergeResult:
    target: Account
    source: Account


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    # The keyset position after the last item, or None at the end.
    next_after: int | None
    # Each item's keyset position, for a page that is cut short.
    keys: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Posting:
    """What one transaction does to an account's cached totals."""

    balance_after: int
    lifetime_after: int


# ---------------------------------------------------------------------------------------
# Errors. Each carries a stable reason (the contract) and the values its message mentions.


class LedgerError(Exception):
    reason = "LEDGER_ERROR"

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = {key: str(value) for key, value in metadata.items()}


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(LedgerError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__(
            "; ".join(f"{v.field}: {v.description}" for v in violations),
            fields=",".join(v.field for v in violations),
        )
        self.violations = violations


class RequestIdReused(LedgerError):
    reason = "REQUEST_ID_REUSED"


class NotFound(LedgerError):
    pass


class ProgramNotFound(NotFound):
    reason = "PROGRAM_NOT_FOUND"


class AccountNotFound(NotFound):
    reason = "ACCOUNT_NOT_FOUND"


class TransactionNotFound(NotFound):
    reason = "POINTS_TRANSACTION_NOT_FOUND"


class AccountAlreadyExists(LedgerError):
    reason = "ACCOUNT_ALREADY_EXISTS"


class ProgramAlreadyExists(LedgerError):
    reason = "PROGRAM_ALREADY_EXISTS"


class FailedPrecondition(LedgerError):
    pass


class AccountNotActive(FailedPrecondition):
    reason = "ACCOUNT_NOT_ACTIVE"


class AccountNotClosed(FailedPrecondition):
    reason = "ACCOUNT_NOT_CLOSED"


class InsufficientPoints(FailedPrecondition):
    reason = "INSUFFICIENT_POINTS"


class BalanceLimitExceeded(FailedPrecondition):
    reason = "BALANCE_LIMIT_EXCEEDED"


class AlreadyReversed(FailedPrecondition):
    reason = "ALREADY_REVERSED"


class NotReversible(FailedPrecondition):
    reason = "NOT_REVERSIBLE"


class ProgramMismatch(FailedPrecondition):
    reason = "PROGRAM_MISMATCH"


class ProgramNotActive(FailedPrecondition):
    """An ARCHIVED program takes no new accounts."""

    reason = "PROGRAM_NOT_ACTIVE"


class CurrencyLocked(FailedPrecondition):
    """A program's currency is fixed once it has an account."""

    reason = "CURRENCY_LOCKED"


class OutOfRange(LedgerError):
    pass


class EventPositionExpired(OutOfRange):
    """The events after the position asked for are no longer retained: some were pruned."""

    reason = "EVENT_POSITION_EXPIRED"


class SubscriberTooSlow(LedgerError):
    """A subscriber fell so far behind that the events waiting for it filled its buffer."""

    reason = "SUBSCRIBER_TOO_SLOW"


class ServerStopping(LedgerError):
    reason = "SERVER_STOPPING"


class EventPositionAhead(OutOfRange):
    """The position asked for is past the newest event: it is not from this event log."""

    reason = "EVENT_POSITION_AHEAD"


# ---------------------------------------------------------------------------------------
# Rules.


def tier_violations(field_path: str, tiers: list[Tier]) -> list[FieldViolation]:
    """What is wrong with a program's tiers: at most MAX_TIERS, names 1 to 40 characters, not
    blank and unique ignoring case (members and staff read "Gold" and "gold" as one tier),
    thresholds at least 0 and strictly increasing (so each member is in one tier)."""
    found = []
    if len(tiers) > MAX_TIERS:
        found.append(FieldViolation(field_path, f"has more than {MAX_TIERS} tiers"))
    seen: set[str] = set()
    for index, tier in enumerate(tiers):
        path = f"{field_path}[{index}]"
        if not 1 <= len(tier.name) <= MAX_TIER_NAME_LENGTH:
            found.append(
                FieldViolation(f"{path}.name", f"must be 1 to {MAX_TIER_NAME_LENGTH} characters")
            )
        elif "\x00" in tier.name:
            found.append(FieldViolation(f"{path}.name", "must not contain the character U+0000"))
        elif not tier.name.strip():
            found.append(FieldViolation(f"{path}.name", "must not be blank"))
        elif tier.name.casefold() in seen:
            found.append(FieldViolation(f"{path}.name", f"repeats the tier name {tier.name!r}"))
        seen.add(tier.name.casefold())
        if tier.lifetime_points < 0:
            found.append(FieldViolation(f"{path}.lifetime_points", "must not be negative"))
        elif index and tier.lifetime_points <= tiers[index - 1].lifetime_points:
            found.append(
                FieldViolation(
                    f"{path}.lifetime_points",
                    f"must be greater than the previous tier's"
                    f" ({tiers[index - 1].lifetime_points})",
                )
            )
    return found


def require_program_active(program: Program) -> None:
    if program.status is not ProgramStatus.ACTIVE:
        raise ProgramNotActive(
            f"program {program.id} is {program.status}, not ACTIVE: it takes no new accounts",
            program=program.id,
            status=program.status,
        )


def check_currency_change(program: Program, currency: str, has_accounts: bool) -> None:
    """The currency may change only while the program has no account: its accounts'
    balances were earned in it, and would silently change value."""
    if currency != program.currency and has_accounts:
        raise CurrencyLocked(
            f"program {program.id} has accounts, whose points were earned in"
            f" {program.currency}; its currency cannot change to {currency}",
            program=program.id,
            currency=program.currency,
            requested=currency,
        )


def require_active(account: Account) -> None:
    if account.status is not AccountStatus.ACTIVE:
        raise AccountNotActive(
            f"account {account.id} is {account.status}, not ACTIVE",
            account=account.id,
            status=account.status,
        )


# The lowest balance a reversal may leave: any, as far as int64 arithmetic is concerned.
NO_FLOOR = -MAX_BALANCE


@dataclass(frozen=True)
class Change:
    """What one transaction does to an account's totals, and the bounds the balance must
    stay within. The store applies it under the account's row lock only within them."""

    delta: int
    lifetime_delta: int
    min_balance: int
    max_balance: int = MAX_BALANCE


def change(
    type_: TransactionType, direction: Direction, amount: int, *, may_overdraw: bool = False
) -> Change:
    """Only reversals may overdraw: reversing points that were already spent is recorded in
    full, leaving a negative balance, because the points really were given back."""
    if direction is Direction.CREDIT:
        lifetime_delta = amount if type_ in LIFETIME_TYPES else 0
        return Change(delta=amount, lifetime_delta=lifetime_delta, min_balance=NO_FLOOR)
    return Change(delta=-amount, lifetime_delta=0, min_balance=NO_FLOOR if may_overdraw else 0)


def check(account: Account, change_: Change) -> Posting:
    """The account's totals after the change, or the error saying why it may not happen."""
    require_active(account)
    balance_after = account.balance + change_.delta
    if balance_after > change_.max_balance:
        raise BalanceLimitExceeded(
            f"balance {account.balance} plus {change_.delta} exceeds {change_.max_balance}",
            balance=account.balance,
            requested=change_.delta,
            limit=change_.max_balance,
        )
    if balance_after < change_.min_balance:
        raise InsufficientPoints(
            f"balance {account.balance} is less than the {-change_.delta} points requested",
            balance=account.balance,
            requested=-change_.delta,
        )
    return Posting(balance_after, account.lifetime_points + change_.lifetime_delta)


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


def revised(account: Account, now: datetime, **changes: object) -> Account:
    """The account after a change: its update time and version move on with it."""
    return replace(account, **changes, update_time=now, version=account.version + 1)  # type: ignore[arg-type]


def tier_for(lifetime_before: int, lifetime_points: int, tiers: list[Tier], current: str) -> str:
    """The tier of an account whose lifetime points went from `lifetime_before` to
    `lifetime_points`: the highest of the program's tiers (in order of threshold) whose
    threshold they reach, but never one below `current`.

    So tiers never demote: if a program's thresholds are raised later, its accounts keep the
    tiers they reached. `current` ranks where it stands in `tiers` ("" below them all). A
    current tier the program no longer has (renamed or removed) cannot be ranked, so it is
    kept until the points cross a threshold: only a tier whose threshold lies above
    `lifetime_before` replaces it. The posting statements in store.py implement the same
    rule in SQL.
    """
    names = [tier.name for tier in tiers]
    held = names.index(current) if current in names else -1
    unknown = current != "" and held == -1
    reached = -1
    for index, tier in enumerate(tiers):
        if tier.lifetime_points <= lifetime_points and (
            not unknown or tier.lifetime_points > lifetime_before
        ):
            reached = index
    return tiers[reached].name if reached > held else current


def merged_target(target: Account, source: Account, now: datetime, tiers: list[Tier]) -> Account:
    """The target after the merge: it holds both accounts' points, and its tier follows its
    lifetime points among its program's `tiers`."""
    lifetime_points = target.lifetime_points + source.lifetime_points
    return revised(
        target,
        now,
        balance=target.balance + source.balance,
        lifetime_points=lifetime_points,
        tier=tier_for(target.lifetime_points, lifetime_points, tiers, target.tier)
        if source.lifetime_points
        else target.tier,  # no change of lifetime points, no change of tier
    )


def merged_source(source: Account, target: Account, now: datetime) -> Account:
    return revised(
        source,
        now,
        status=AccountStatus.MERGED,
        merged_into=target.id,
        balance=0,
        lifetime_points=0,
    )


@dataclass(frozen=True)
class AccountFilter:
    program: str | None = None
    customer: str | None = None
    status: AccountStatus | None = None


@dataclass(frozen=True)
class TransactionFilter:
    account: str | None = None
    type: TransactionType | None = None
    direction: Direction | None = None


@dataclass(frozen=True)
class NewProgram:
    """A validated request to create a program."""

    name: str
    currency: str
    auto_enroll: bool = False
    tiers: list[Tier] = field(default_factory=list)
    status: ProgramStatus = ProgramStatus.ACTIVE


@dataclass(frozen=True)
class ProgramChanges:
    """A validated UpdateProgram; None leaves a field as it is."""

    name: str | None = None
    currency: str | None = None
    auto_enroll: bool | None = None
    tiers: list[Tier] | None = None
    status: ProgramStatus | None = None


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


# ---------------------------------------------------------------------------------------
# Events: what the event log records of each change, for subscribers.


class EventType(enum.StrEnum):
    ACCOUNT_CREATED = "loyalty.account.created"
    ACCOUNT_UPDATED = "loyalty.account.updated"
    ACCOUNT_CLOSED = "loyalty.account.closed"
    ACCOUNT_REOPENED = "loyalty.account.reopened"
    ACCOUNT_MERGED = "loyalty.account.merged"
    ACCOUNT_TIER_CHANGED = "loyalty.account.tier_changed"
    TRANSACTION_CREATED = "points_transaction.created"


ACCOUNT_EVENT_TYPES = frozenset(t for t in EventType if t.startswith("loyalty.account."))
TRANSACTION_EVENT_TYPES = frozenset({EventType.TRANSACTION_CREATED})


@dataclass(frozen=True)
class Event:
    id: str  # `evt_` + random: the same on every delivery, for consumers to de-duplicate
    type: EventType
    create_time: datetime
    program: str
    account: str
    # The resource as of the change: an Account (account events) or a PointsTransaction.
    snapshot: Account | PointsTransaction
    # 1, 2, 3, ... in commit order; 0 until the event is written.
    position: int = 0


def account_event(type_: EventType, account: Account) -> Event:
    return Event(
        id=new_id("evt_"),
        type=type_,
        create_time=account.update_time,
        program=account.program,
        account=account.id,
        snapshot=account,
    )


def transaction_event(transaction: PointsTransaction, program: str) -> Event:
    return Event(
        id=new_id("evt_"),
        type=EventType.TRANSACTION_CREATED,
        create_time=transaction.create_time,
        program=program,
        account=transaction.account,
        snapshot=transaction,
    )


@dataclass(frozen=True)
class EventFilter:
    """Which events a subscriber or a list wants; None and empty mean any."""

    types: frozenset[EventType]
    program: str | None = None
    account: str | None = None

    def matches(self, event: Event) -> bool:
        return (
            event.type in self.types
            and (self.program is None or event.program == self.program)
            and (self.account is None or event.account == self.account)
        )


def position_expired(after: int, oldest: int) -> EventPositionExpired:
    return EventPositionExpired(
        f"events after position {after} are no longer retained; the oldest retained is {oldest}",
        position=after,
        oldestPosition=oldest,
    )


def check_position(after: int, oldest: int, newest: int) -> None:
    """A stream or list may start after any position from just before the oldest retained
    event up to the newest: anything else would skip events silently."""
    if after < oldest - 1:
        raise position_expired(after, oldest)
    if after > newest:
        raise EventPositionAhead(
            f"position {after} is past the newest event, {newest}",
            position=after,
            newestPosition=newest,
        )
