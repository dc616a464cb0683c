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
class Tier:
    name: str
    # The lifetime points from which a member is in this tier.
    lifetime_points: int


class RuleTrigger(enum.StrEnum):
    PAYMENT_COMPLETED = "payment.completed"
    ACCOUNT_CREATED = "loyalty.account.created"


@dataclass(frozen=True)
class TierMultiplier:
    tier: str
    multiplier: str  # a decimal with up to 2 places, e.g. "1.5"


@dataclass(frozen=True)
class EarningRule:
    """How points are earned: from payments, or as a welcome bonus when an account is
    created. In a request, `id` "" means a new rule and `version` is ignored."""

    trigger: RuleTrigger
    name: str = ""
    # Payment rules: points per unit of the currency (a decimal with up to 4 places), the
    # smallest amount that earns (minor units), the most points per payment (0: no cap),
    # multipliers by tier, and the window `occurred_at` must fall in.
    points_per_unit: str = ""
    min_amount: int = 0
    max_points: int = 0
    tier_multipliers: list[TierMultiplier] = field(default_factory=list)
    start_time: datetime | None = None
    end_time: datetime | None = None
    # Welcome rules: the bonus.
    points: int = 0
    id: str = ""
    version: int = 0


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
    earning_rules: list[EarningRule] = field(default_factory=list)


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
    # For an earn credited by an earning rule: the rule and its version then.
    rule: str | None = None
    rule_version: int | None = None


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


# Field violations one error reports: the first ones, and a count of the rest. A request
# with a million bad entries gets an error of the same size as one with ten.
MAX_VIOLATIONS = 8


class InvalidArgument(LedgerError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], omitted: int = 0) -> None:
        shown = violations[:MAX_VIOLATIONS]
        omitted += len(violations) - len(shown)
        message = "; ".join(f"{v.field}: {v.description}" for v in shown)
        extra = {"omittedViolations": omitted} if omitted else {}
        if omitted:  # first: a long message is cut at its end
            message = f"{len(shown) + omitted} problems, the first {len(shown)}: {message}"
        super().__init__(message, fields=",".join(v.field for v in shown), **extra)
        self.violations = shown
        self.omitted = omitted


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


class CurrencyMismatch(FailedPrecondition):
    """A payment in another currency than its program's."""

    reason = "CURRENCY_MISMATCH"


class PointsLimitExceeded(FailedPrecondition):
    """An earning rule would credit more points than one transaction may hold."""

    reason = "POINTS_LIMIT_EXCEEDED"


class RefundExceedsPayment(FailedPrecondition):
    reason = "REFUND_EXCEEDS_PAYMENT"


class EarningRuleNotFound(NotFound):
    reason = "EARNING_RULE_NOT_FOUND"


class PaymentNotFound(NotFound):
    reason = "PAYMENT_NOT_FOUND"


class PaymentIdReused(RequestIdReused):
    reason = "PAYMENT_ID_REUSED"


class RefundIdReused(RequestIdReused):
    reason = "REFUND_ID_REUSED"


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
    return within_bounds(account, change_)


def within_bounds(account: Account, change_: Change) -> Posting:
    """The account's totals after the change, or why its balance may not go there."""
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
    earning_rules: list[EarningRule] = field(default_factory=list)


@dataclass(frozen=True)
class ProgramChanges:
    """A validated UpdateProgram; None leaves a field as it is."""

    name: str | None = None
    currency: str | None = None
    auto_enroll: bool | None = None
    tiers: list[Tier] | None = None
    status: ProgramStatus | None = None
    earning_rules: list[EarningRule] | None = None


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


# ---------------------------------------------------------------------------------------
# Earning rules, payments and refunds.

MAX_RULES = 20
MAX_RULE_NAME_LENGTH = 200
MAX_POINTS_PER_UNIT = 1_000_000
MAX_MULTIPLIER = 100
MAX_PAYMENT_AMOUNT = 10**15  # minor units
MAX_PAYMENT_ID_LENGTH = 255
RATE_PLACES = 4  # decimal places of points_per_unit
MULTIPLIER_PLACES = 2
RULE_ID = re.compile(r"^rule_[A-Za-z0-9]{20}$")
_DECIMAL = re.compile(r"([0-9]+)(?:\.([0-9]+))?")

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


def scaled(decimal: str, places: int) -> int | None:
    """A decimal string as an integer count of 10^-places, or None if it is not a plain
    decimal with at most `places` decimal places. Integers only: no float ever touches a
    points computation."""
    match = _DECIMAL.fullmatch(decimal)
    if match is None or len(match.group(2) or "") > places or len(match.group(1)) > 12:
        return None
    whole, fraction = match.group(1), match.group(2) or ""
    return int(whole) * 10**places + int(fraction.ljust(places, "0") or "0")


def _decimal_violation(text: str, places: int, maximum: int) -> str | None:
    value = scaled(text, places)
    if value is None:
        return f"must be a plain decimal with at most {places} decimal places, e.g. '1.5'"
    if not 0 < value <= maximum * 10**places:
        return f"must be greater than 0 and at most {maximum}"
    return None


def rule_violations(
    field_path: str, rules: list[EarningRule], tiers: list[Tier]
) -> list[FieldViolation]:
    """What is wrong with a program's earning rules, given the program's `tiers`."""
    found = []
    if len(rules) > MAX_RULES:
        found.append(FieldViolation(field_path, f"has more than {MAX_RULES} rules"))
    tier_names = {tier.name for tier in tiers}
    for index, rule in enumerate(rules):
        path = f"{field_path}[{index}]"

        def add(name: str, description: str) -> None:
            found.append(FieldViolation(f"{path}.{name}", description))  # noqa: B023

        if len(rule.name) > MAX_RULE_NAME_LENGTH:
            add("name", f"is longer than {MAX_RULE_NAME_LENGTH} characters")
        elif "\x00" in rule.name:
            add("name", "must not contain the character U+0000")
        if rule.trigger is RuleTrigger.ACCOUNT_CREATED:
            if not 1 <= rule.points <= MAX_AMOUNT:
                add("points", f"must be between 1 and {MAX_AMOUNT} for a welcome rule")
            payment_fields = {
                "points_per_unit": rule.points_per_unit != "",
                "min_amount": rule.min_amount != 0,
                "max_points": rule.max_points != 0,
                "tier_multipliers": bool(rule.tier_multipliers),
                "start_time": rule.start_time is not None,
                "end_time": rule.end_time is not None,
            }
            for name, is_set in payment_fields.items():
                if is_set:
                    add(name, "applies to payment rules only; must be unset")
            continue
        if rule.points:
            add("points", "applies to welcome rules only; must be 0")
        if not rule.points_per_unit:
            add("points_per_unit", "is required")
        elif problem := _decimal_violation(rule.points_per_unit, RATE_PLACES, MAX_POINTS_PER_UNIT):
            add("points_per_unit", problem)
        if not 0 <= rule.min_amount <= MAX_PAYMENT_AMOUNT:
            add("min_amount", f"must be between 0 and {MAX_PAYMENT_AMOUNT}")
        if not 0 <= rule.max_points <= MAX_AMOUNT:
            add("max_points", f"must be between 0 (no cap) and {MAX_AMOUNT}")
        if rule.start_time and rule.end_time and rule.start_time >= rule.end_time:
            add("end_time", "must be after start_time")
        seen: set[str] = set()
        for m_index, multiplier in enumerate(rule.tier_multipliers):
            m_path = f"tier_multipliers[{m_index}]"
            if multiplier.tier not in tier_names:
                add(f"{m_path}.tier", f"{multiplier.tier[:40]!r} is not a tier of the program")
            elif multiplier.tier in seen:
                add(f"{m_path}.tier", f"repeats the tier {multiplier.tier!r}")
            seen.add(multiplier.tier)
            problem = _decimal_violation(multiplier.multiplier, MULTIPLIER_PLACES, MAX_MULTIPLIER)
            if problem:
                add(f"{m_path}.multiplier", problem)
    return found


def versioned_rules(
    field_path: str, current: list[EarningRule], requested: list[EarningRule]
) -> list[EarningRule]:
    """The rules after a change: a requested rule with the id of a current one keeps the id,
    and its version goes up by one if anything in it changed; one without an id is new, at
    version 1. Raises InvalidArgument for ids the program does not have, or repeats."""
    by_id = {rule.id: rule for rule in current}
    found, seen, result = [], set(), []
    for index, rule in enumerate(requested):
        if not rule.id:
            result.append(replace(rule, id=new_id("rule_"), version=1))
            continue
        if rule.id not in by_id:
            found.append(
                FieldViolation(f"{field_path}[{index}].id", "is not a rule of the program")
            )
        elif rule.id in seen:
            found.append(FieldViolation(f"{field_path}[{index}].id", "repeats a rule"))
        else:
            old = by_id[rule.id]
            if _meaning(replace(rule, version=old.version)) == _meaning(old):
                result.append(old)  # as it was saved: its version says what it is
            else:
                result.append(replace(rule, version=old.version + 1))
        seen.add(rule.id)
    if found:
        raise InvalidArgument(found)
    return result


def _meaning(rule: EarningRule) -> EarningRule:
    """The rule with its decimals in one spelling, so "1.50" for "1.5" is no change."""

    def same(text: str, places: int) -> str:
        value = scaled(text, places)
        return text if value is None else str(value)

    return replace(
        rule,
        points_per_unit=same(rule.points_per_unit, RATE_PLACES),
        tier_multipliers=[
            replace(m, multiplier=same(m.multiplier, MULTIPLIER_PLACES))
            for m in rule.tier_multipliers
        ],
    )


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


def starting_tier(program: Program) -> str:
    """The tier of a new account: the one its lifetime points of 0 reach (if any tier starts
    at 0)."""
    return tier_for(0, 0, program.tiers, "")


def welcomed_tier(program: Program) -> str:
    """The tier a new account has once its welcome bonus is credited: what a payment that
    enrolls it earns by."""
    bonus = sum(earn.points for earn in welcome_earns(program.earning_rules))
    return tier_for(0, bonus, program.tiers, starting_tier(program))


@dataclass(frozen=True)
class Credited:
    account: Account  # after the earns
    transactions: list[PointsTransaction]
    # A transaction event per earn, each followed by a tier_changed event if it promoted.
    events: list[Event]


def credit_earns(
    account: Account,
    earns: list[Earn],
    origin: tuple[OriginKind, str],
    metadata: dict[str, str],
    program: Program,
    now: datetime,
) -> Credited:
    """`earns` credited in order to `account`. An origin id "" means each earn's own rule
    (a welcome bonus is caused by its rule)."""
    transactions, new_events = [], []
    for earn in earns:
        before = account
        account = credited(account, earn.points, program.tiers, now)
        cause = (origin[0], origin[1] or earn.rule.id)
        ptx = earn_transaction(account, earn, cause, metadata)
        transactions.append(ptx)
        new_events.append(transaction_event(ptx, program.id))
        if account.tier != before.tier:
            new_events.append(account_event(EventType.ACCOUNT_TIER_CHANGED, account))
    return Credited(account, transactions, new_events)


def credited(account: Account, points: int, tiers: list[Tier], now: datetime) -> Account:
    """The account after an EARN of `points`: balance and lifetime points up, tier following
    the lifetime points. Raises why it may not happen (not ACTIVE, balance limit)."""
    posting = check(account, change(TransactionType.EARN, Direction.CREDIT, points))
    return revised(
        account,
        now,
        balance=posting.balance_after,
        lifetime_points=posting.lifetime_after,
        tier=tier_for(account.lifetime_points, posting.lifetime_after, tiers, account.tier),
    )


def earn_transaction(
    account: Account, earn: Earn, origin: tuple[OriginKind, str], metadata: dict[str, str]
) -> PointsTransaction:
    """The ledger row of an earn just credited to `account` (as it is after it)."""
    return PointsTransaction(
        id=new_id("ptx_"),
        account=account.id,
        type=TransactionType.EARN,
        direction=Direction.CREDIT,
        amount=earn.points,
        points_after=account.balance,
        reason=earn.rule.name,
        origin_kind=origin[0],
        origin_id=origin[1],
        metadata=metadata,
        create_time=account.update_time,
        rule=earn.rule.id,
        rule_version=earn.rule.version,
    )


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


def reversed_by(
    account: Account, original: PointsTransaction, points: int, now: datetime, *, refund: bool
) -> Account:
    """The account after reversing `points` of `original`. A reversal may take the balance
    below zero (points given back are taken back even if spent); lifetime points and tier
    stay. It needs an ACTIVE account, except a refund's, which a CLOSED account takes too:
    the money went back whatever became of the account, and the refund must not wait for a
    reopen that the customer's newer ACTIVE account would forbid."""
    if not (refund and account.status is AccountStatus.CLOSED):
        require_active(account)
    direction = original.direction.opposite()
    posting = within_bounds(
        account, change(TransactionType.REVERSE, direction, points, may_overdraw=True)
    )
    return revised(account, now, balance=posting.balance_after)


def reversal_transaction(
    account: Account,
    original: PointsTransaction,
    points: int,
    origin: tuple[OriginKind, str],
    reason: str,
) -> PointsTransaction:
    """The ledger row of a reversal of `original` just posted to `account` (as after it)."""
    return PointsTransaction(
        id=new_id("ptx_"),
        account=account.id,
        type=TransactionType.REVERSE,
        direction=original.direction.opposite(),
        amount=points,
        points_after=account.balance,
        reason=reason,
        origin_kind=origin[0],
        origin_id=origin[1],
        metadata={},
        create_time=account.update_time,
        reverses=original.id,
    )
