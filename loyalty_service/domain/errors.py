"""Domain errors: each names its reason (the contract) and the values its message mentions."""

from __future__ import annotations

from dataclasses import dataclass


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
