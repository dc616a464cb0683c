"""Domain errors: each names its reason (the contract) and the values its message mentions."""

from __future__ import annotations

from dataclasses import dataclass


class LedgerError(Exception):
    reason = "LEDGER_ERROR"

    def __init_subclass__(cls, reason: str = "", **kwargs: object) -> None:
        # The reason goes in the class line, `class X(Kind, reason="X")`, so the errors
        # below read as one table of name, kind (its gRPC code) and reason.
        super().__init_subclass__(**kwargs)
        if reason:
            cls.reason = reason

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


class InvalidArgument(LedgerError, reason="INVALID_ARGUMENT"):
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


class RequestIdReused(LedgerError, reason="REQUEST_ID_REUSED"): ...


class PaymentIdReused(RequestIdReused, reason="PAYMENT_ID_REUSED"): ...


class RefundIdReused(RequestIdReused, reason="REFUND_ID_REUSED"): ...


class HoldReferenceReused(RequestIdReused, reason="HOLD_REFERENCE_REUSED"):
    """A hold's reference sent again with other fields than its first request's."""


class NotFound(LedgerError): ...


class ProgramNotFound(NotFound, reason="PROGRAM_NOT_FOUND"): ...


class AccountNotFound(NotFound, reason="ACCOUNT_NOT_FOUND"): ...


class TransactionNotFound(NotFound, reason="POINTS_TRANSACTION_NOT_FOUND"): ...


class EarningRuleNotFound(NotFound, reason="EARNING_RULE_NOT_FOUND"): ...


class PaymentNotFound(NotFound, reason="PAYMENT_NOT_FOUND"): ...


class HoldNotFound(NotFound, reason="HOLD_NOT_FOUND"): ...


class AccountAlreadyExists(LedgerError, reason="ACCOUNT_ALREADY_EXISTS"): ...


class ProgramAlreadyExists(LedgerError, reason="PROGRAM_ALREADY_EXISTS"): ...


class FailedPrecondition(LedgerError): ...


class AccountNotActive(FailedPrecondition, reason="ACCOUNT_NOT_ACTIVE"): ...


class AccountNotClosed(FailedPrecondition, reason="ACCOUNT_NOT_CLOSED"): ...


class InsufficientPoints(FailedPrecondition, reason="INSUFFICIENT_POINTS"): ...


class BalanceLimitExceeded(FailedPrecondition, reason="BALANCE_LIMIT_EXCEEDED"): ...


class AlreadyReversed(FailedPrecondition, reason="ALREADY_REVERSED"): ...


class NotReversible(FailedPrecondition, reason="NOT_REVERSIBLE"): ...


class ProgramMismatch(FailedPrecondition, reason="PROGRAM_MISMATCH"): ...


class ProgramNotActive(FailedPrecondition, reason="PROGRAM_NOT_ACTIVE"):
    """An ARCHIVED program takes no new accounts."""


class CurrencyLocked(FailedPrecondition, reason="CURRENCY_LOCKED"):
    """A program's currency is fixed once it has an account."""


class CurrencyMismatch(FailedPrecondition, reason="CURRENCY_MISMATCH"):
    """A payment in another currency than its program's."""


class PointsLimitExceeded(FailedPrecondition, reason="POINTS_LIMIT_EXCEEDED"):
    """An earning rule would credit more points than one transaction may hold."""


class RefundExceedsPayment(FailedPrecondition, reason="REFUND_EXCEEDS_PAYMENT"): ...


class HoldNotActive(FailedPrecondition, reason="HOLD_NOT_ACTIVE"):
    """A capture or release of a hold that is no longer HELD (captured, released, expired)."""


class CaptureExceedsHold(FailedPrecondition, reason="CAPTURE_EXCEEDS_HOLD"): ...


class AccountHasActiveHolds(FailedPrecondition, reason="ACCOUNT_HAS_ACTIVE_HOLDS"):
    """An account with HELD holds cannot be closed: release them, or let them expire."""


class OutOfRange(LedgerError): ...


class EventPositionExpired(OutOfRange, reason="EVENT_POSITION_EXPIRED"):
    """The events after the position asked for are no longer retained: some were pruned."""


class EventPositionAhead(OutOfRange, reason="EVENT_POSITION_AHEAD"):
    """The position asked for is past the newest event: it is not from this event log."""


class SubscriberTooSlow(LedgerError, reason="SUBSCRIBER_TOO_SLOW"):
    """A subscriber fell so far behind that the events waiting for it filled its buffer."""


class ServerStopping(LedgerError, reason="SERVER_STOPPING"): ...


class Unauthenticated(LedgerError):
    """No credentials, or credentials that do not prove who is calling."""


class CredentialsMissing(Unauthenticated, reason="CREDENTIALS_MISSING"): ...


class TokenMalformed(Unauthenticated, reason="TOKEN_MALFORMED"):
    """Not a JWT, or one without a claim this service needs (exp, iss, aud, an identity)."""


class TokenExpired(Unauthenticated, reason="TOKEN_EXPIRED"): ...


class TokenNotYetValid(Unauthenticated, reason="TOKEN_NOT_YET_VALID"): ...


class TokenBadSignature(Unauthenticated, reason="TOKEN_BAD_SIGNATURE"): ...


class TokenUnknownKey(Unauthenticated, reason="TOKEN_UNKNOWN_KEY"):
    """Signed with a key id the JWKS does not hold, even after a refresh."""


class TokenWrongIssuer(Unauthenticated, reason="TOKEN_WRONG_ISSUER"): ...


class TokenWrongAudience(Unauthenticated, reason="TOKEN_WRONG_AUDIENCE"): ...


class CertificateWithoutIdentity(Unauthenticated, reason="CERTIFICATE_WITHOUT_IDENTITY"):
    """A trusted client certificate with neither a URI SAN nor a subject CN."""


class ForwardedCertificateMalformed(Unauthenticated, reason="FORWARDED_CERTIFICATE_MALFORMED"):
    """An x-forwarded-client-cert header (trusted) that names no identity."""


class PermissionDenied(LedgerError): ...


class MissingScope(PermissionDenied, reason="MISSING_SCOPE"): ...


class ProgramsRestricted(PermissionDenied, reason="PROGRAMS_RESTRICTED"):
    """A caller limited to some programs may not create another."""
