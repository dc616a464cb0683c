"""Proto <-> domain: request validation, resources, timestamps and page tokens."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from . import domain
from .domain.accounts import Account, AccountStatus
from .domain.errors import FieldViolation, InvalidArgument
from .domain.events import Event, EventFilter, EventType
from .domain.payments import NewPayment, NewRefund, PaymentOutcome, PaymentResult, RefundResult
from .domain.points import Direction, OriginKind, PointsTransaction, TransactionType
from .domain.programs import (
    EarningRule,
    NewProgram,
    Program,
    ProgramChanges,
    ProgramStatus,
    RuleTrigger,
    Tier,
    TierMultiplier,
)
from .pb import accounts_pb2, events_pb2, points_pb2, programs_pb2

E = TypeVar("E")

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100

AccountPb = accounts_pb2.Account
TransactionPb = points_pb2.PointsTransaction
OriginPb = points_pb2.Origin
ProgramPb = programs_pb2.Program

_STATUS_TO_PB = {s: AccountPb.Status.Value(f"STATUS_{s.value}") for s in AccountStatus}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}
_TYPE_TO_PB = {t: TransactionPb.Type.Value(f"TYPE_{t.value}") for t in TransactionType}
_TYPE_FROM_PB = {v: k for k, v in _TYPE_TO_PB.items()}
_DIRECTION_TO_PB = {d: TransactionPb.Direction.Value(f"DIRECTION_{d.value}") for d in Direction}
_DIRECTION_FROM_PB = {v: k for k, v in _DIRECTION_TO_PB.items()}
_ORIGIN_TO_PB = {k: OriginPb.Kind.Value(f"KIND_{k.value}") for k in OriginKind}
_ORIGIN_FROM_PB = {v: k for k, v in _ORIGIN_TO_PB.items()}
_PROGRAM_STATUS_TO_PB = {s: ProgramPb.Status.Value(f"STATUS_{s.value}") for s in ProgramStatus}
_PROGRAM_STATUS_FROM_PB = {v: k for k, v in _PROGRAM_STATUS_TO_PB.items()}
RulePb = programs_pb2.EarningRule
_TRIGGER_TO_PB = {
    RuleTrigger.PAYMENT_COMPLETED: RulePb.TRIGGER_PAYMENT_COMPLETED,
    RuleTrigger.ACCOUNT_CREATED: RulePb.TRIGGER_ACCOUNT_CREATED,
}
_TRIGGER_FROM_PB = {v: k for k, v in _TRIGGER_TO_PB.items()}
PaymentPb = points_pb2.Payment
_OUTCOME_TO_PB = {o: PaymentPb.Outcome.Value(f"OUTCOME_{o.value}") for o in PaymentOutcome}
# Origins only the service writes.
_RESERVED_ORIGINS = (OriginKind.MERGE, OriginKind.REFUND)


# The seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: what a datetime holds.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
# PostgreSQL text cannot hold U+0000, so a string with one could never be stored.
_NUL_MESSAGE = "must not contain the character U+0000"


@dataclass
class Violations:
    """Collects the problems with a request, so one error names them: the first
    domain.errors.MAX_VIOLATIONS of them, and how many more there were."""

    found: list[FieldViolation] = field(default_factory=list)
    omitted: int = 0

    def add(self, field_path: str, description: str) -> None:
        self.extend([FieldViolation(field_path, description)])

    def extend(self, violations: Sequence[FieldViolation]) -> None:
        room = max(0, domain.errors.MAX_VIOLATIONS - len(self.found))
        self.found.extend(violations[:room])
        self.omitted += max(0, len(violations) - room)

    def raise_if_any(self) -> None:
        if self.found:
            raise InvalidArgument(self.found, self.omitted)

    def at_most(self, field_path: str, values: Sized, maximum: int, what: str) -> None:
        """Refuses the request at once if a repeated field or map has more than `maximum`
        entries: checked before any work per entry, so a huge request costs no more than a
        small one."""
        if len(values) > maximum:
            self.add(field_path, f"has more than {maximum} {what}")
            self.raise_if_any()

    # -- field checks; each returns the cleaned value ---------------------------------------

    def id(
        self, field_path: str, value: str, pattern: re.Pattern[str], *, required: bool = True
    ) -> str:
        if not value:
            if required:
                self.add(field_path, "is required")
        elif not pattern.fullmatch(value):  # not match: `$` also matches before a "\n"
            self.add(field_path, f"is not a valid id (expected {pattern.pattern})")
        return value

    def text(self, field_path: str, value: str, max_length: int) -> str:
        if len(value) > max_length:
            self.add(field_path, f"is longer than {max_length} characters")
        if "\x00" in value:
            self.add(field_path, _NUL_MESSAGE)
        return value

    def metadata(self, field_path: str, value: Mapping[str, str]) -> dict[str, str]:
        self.at_most(field_path, value, domain.ids.MAX_METADATA_KEYS, "keys")
        for key, item in value.items():
            if not key or len(key) > domain.ids.MAX_METADATA_KEY_LENGTH:
                self.add(
                    f"{field_path}[{key[:40]}]",
                    f"keys must be 1 to {domain.ids.MAX_METADATA_KEY_LENGTH} characters",
                )
            if len(item) > domain.ids.MAX_METADATA_VALUE_LENGTH:
                self.add(
                    f"{field_path}[{key[:40]}]",
                    f"values must be at most {domain.ids.MAX_METADATA_VALUE_LENGTH} characters",
                )
            if "\x00" in key or "\x00" in item:
                self.add(f"{field_path}[{key[:40]}]", _NUL_MESSAGE)
        return dict(value)

    def amount(self, field_path: str, value: int) -> int:
        if not 1 <= value <= domain.ids.MAX_AMOUNT:
            self.add(field_path, f"must be between 1 and {domain.ids.MAX_AMOUNT}")
        return value

    def timestamp(self, field_path: str, value: Timestamp) -> datetime | None:
        """The time, or None (with a violation) if it is outside what a datetime holds."""
        if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 10**9):
            self.add(field_path, "must be between 0001-01-01 and 9999-12-31 (UTC)")
            return None
        return value.ToDatetime(tzinfo=UTC)

    def request_id(self, value: str) -> str:
        return self.text("request_id", value, domain.ids.MAX_REQUEST_ID_LENGTH)

    def enum(
        self, field_path: str, value: int, table: Mapping[int, E], *, required: bool
    ) -> E | None:
        if value == 0:
            if required:
                self.add(field_path, "is required")
            return None
        if value not in table:
            self.add(field_path, f"has unknown value {value}")
            return None
        return table[value]


# ---------------------------------------------------------------------------------------
# Requests.


def customer(violations: Violations, field_path: str, value: str) -> str | None:
    return violations.text(field_path, value, domain.accounts.MAX_CUSTOMER_LENGTH) or None


def new_transaction(
    request: points_pb2.CreatePointsTransactionRequest,
) -> domain.points.NewTransaction:
    v = Violations()
    account = v.id("account", request.account, domain.ids.ACCOUNT_ID)
    type_ = v.enum("type", request.type, _TYPE_FROM_PB, required=True)
    direction = v.enum("direction", request.direction, _DIRECTION_FROM_PB, required=False)
    if type_ is TransactionType.REVERSE:
        v.add("type", "REVERSE transactions are posted by ReversePointsTransaction")
    elif type_ is TransactionType.ADJUST and request.direction == 0:
        v.add("direction", "is required for ADJUST")
    elif type_ in domain.points.IMPLIED_DIRECTION:
        implied = domain.points.IMPLIED_DIRECTION[type_]
        if direction is not None and direction is not implied:
            v.add("direction", f"{type_} is always a {implied}")
        direction = implied
    amount = v.amount("amount", request.amount)
    reason = v.text("reason", request.reason, domain.points.MAX_REASON_LENGTH)
    origin_kind = v.enum("origin.kind", request.origin.kind, _ORIGIN_FROM_PB, required=False)
    if origin_kind in _RESERVED_ORIGINS:
        v.add("origin.kind", f"{origin_kind} is reserved for the service")
    origin_id = v.text("origin.id", request.origin.id, domain.points.MAX_ORIGIN_ID_LENGTH)
    metadata = v.metadata("metadata", request.metadata)
    v.request_id(request.request_id)
    v.raise_if_any()
    assert type_ is not None and direction is not None
    return domain.points.NewTransaction(
        account=account,
        type=type_,
        direction=direction,
        amount=amount,
        reason=reason,
        origin_kind=origin_kind or OriginKind.MANUAL,
        origin_id=origin_id,
        metadata=metadata,
    )


# The fields UpdateProgram and UpdateAccount may change (AIP-134 paths).
PROGRAM_PATHS = ("name", "currency", "auto_enroll", "tiers", "earning_rules", "status")
ACCOUNT_PATHS = ("customer", "metadata")
MAX_MASK_PATHS = 20


def update_paths(v: Violations, paths: Sequence[str], updatable: Sequence[str]) -> set[str]:
    """The fields an update_mask names, `*` standing for all of `updatable`; each unknown
    path is a violation. Empty when the mask is: the caller then takes the fields set."""
    v.at_most("update_mask", paths, MAX_MASK_PATHS, "paths")
    named = set(paths)
    if "*" in named:
        named = (named - {"*"}) | set(updatable)
    for unknown in sorted(named - set(updatable)):
        v.add("update_mask", f"cannot update {unknown[:100]!r}; updatable: {', '.join(updatable)}")
    return named


def _program_name(v: Violations, field_path: str, value: str) -> str:
    if not value.strip():
        v.add(field_path, "is required")
    return v.text(field_path, value, domain.programs.MAX_PROGRAM_NAME_LENGTH)


def _currency(v: Violations, field_path: str, value: str) -> str:
    if not value:
        v.add(field_path, "is required")
    elif not domain.programs.CURRENCY.fullmatch(value):
        v.add(field_path, "must be an ISO 4217 code: three uppercase letters")
    return value


def _tiers(v: Violations, field_path: str, values: Sequence[programs_pb2.Tier]) -> list[Tier]:
    v.at_most(field_path, values, domain.programs.MAX_TIERS, "tiers")
    tiers = [Tier(t.name, t.lifetime_points) for t in values]
    v.extend(domain.programs.tier_violations(field_path, tiers))
    return tiers


def _rules(
    v: Violations, field_path: str, values: Sequence[programs_pb2.EarningRule]
) -> list[EarningRule]:
    """The rules as asked for; what they say is checked by domain.programs.rule_violations, against
    the tiers the program will have."""
    v.at_most(field_path, values, domain.programs.MAX_RULES, "rules")
    rules = []
    for index, rule in enumerate(values):
        path = f"{field_path}[{index}]"
        trigger = v.enum(f"{path}.trigger", rule.trigger, _TRIGGER_FROM_PB, required=True)
        multipliers = rule.tier_multipliers
        v.at_most(f"{path}.tier_multipliers", multipliers, domain.programs.MAX_TIERS, "entries")
        rules.append(
            EarningRule(
                trigger=trigger or RuleTrigger.PAYMENT_COMPLETED,
                name=rule.name,
                points_per_unit=rule.points_per_unit,
                min_amount=rule.min_amount,
                max_points=rule.max_points,
                tier_multipliers=[TierMultiplier(m.tier, m.multiplier) for m in multipliers],
                start_time=v.timestamp(f"{path}.start_time", rule.start_time)
                if rule.HasField("start_time")
                else None,
                end_time=v.timestamp(f"{path}.end_time", rule.end_time)
                if rule.HasField("end_time")
                else None,
                points=rule.points,
                id=rule.id,
            )
        )
    return rules


def _rule_changes(v: Violations, values: Sequence[programs_pb2.EarningRule]) -> list[EarningRule]:
    for index, rule in enumerate(values[: domain.programs.MAX_RULES]):
        v.id(f"program.earning_rules[{index}].id", rule.id, domain.ids.RULE_ID, required=False)
    return _rules(v, "program.earning_rules", values)


def new_program(request: programs_pb2.CreateProgramRequest) -> tuple[str | None, NewProgram]:
    """The id asked for (None: generate one) and the program to create."""
    v = Violations()
    program_id = v.id("program_id", request.program_id, domain.ids.PROGRAM_ID, required=False)
    program = request.program
    name = _program_name(v, "program.name", program.name)
    currency = _currency(v, "program.currency", program.currency)
    tiers = _tiers(v, "program.tiers", program.tiers)
    status = v.enum("program.status", program.status, _PROGRAM_STATUS_FROM_PB, required=False)
    # Rule ids are output only here: the program's rules are all new.
    rules = [replace(r, id="") for r in _rules(v, "program.earning_rules", program.earning_rules)]
    v.extend(domain.programs.rule_violations("program.earning_rules", rules, tiers))
    v.request_id(request.request_id)
    v.raise_if_any()
    new = NewProgram(
        name=name,
        currency=currency,
        auto_enroll=program.auto_enroll,
        tiers=tiers,
        status=status or ProgramStatus.ACTIVE,
        earning_rules=rules,
    )
    return program_id or None, new


def program_changes(request: programs_pb2.UpdateProgramRequest) -> tuple[str, ProgramChanges]:
    """The program to update and what changes, as the update_mask says (AIP-134): an empty
    mask means the fields that are set, `*` all of them. Only the named fields are read."""
    v = Violations()
    program = request.program
    program_id = v.id("program.id", program.id, domain.ids.PROGRAM_ID)
    paths = update_paths(v, request.update_mask.paths, PROGRAM_PATHS)
    if not paths:
        # A proto3 scalar at its default is not "set": false and [] need the mask.
        set_fields = {
            "name": bool(program.name),
            "currency": bool(program.currency),
            "auto_enroll": program.auto_enroll,
            "tiers": bool(program.tiers),
            "earning_rules": bool(program.earning_rules),
            "status": program.status != 0,
        }
        paths = {path for path, is_set in set_fields.items() if is_set}
    changes = ProgramChanges(
        name=_program_name(v, "program.name", program.name) if "name" in paths else None,
        currency=_currency(v, "program.currency", program.currency)
        if "currency" in paths
        else None,
        auto_enroll=program.auto_enroll if "auto_enroll" in paths else None,
        tiers=_tiers(v, "program.tiers", program.tiers) if "tiers" in paths else None,
        earning_rules=_rule_changes(v, program.earning_rules) if "earning_rules" in paths else None,
        status=v.enum("program.status", program.status, _PROGRAM_STATUS_FROM_PB, required=True)
        if "status" in paths
        else None,
    )
    v.request_id(request.request_id)
    if not paths:
        v.add("update_mask", "names nothing to update")
    v.raise_if_any()
    return program_id, changes


def new_payment(request: points_pb2.RecordPaymentRequest) -> NewPayment:
    v = Violations()
    payment_id = _external_id(v, "payment_id", request.payment_id)
    program = v.id("program", request.program, domain.ids.PROGRAM_ID)
    customer_ = customer(v, "customer", request.customer)
    if not 1 <= request.amount <= domain.programs.MAX_PAYMENT_AMOUNT:
        v.add("amount", f"must be between 1 and {domain.programs.MAX_PAYMENT_AMOUNT} (minor units)")
    currency = _currency(v, "currency", request.currency)
    occurred_at = None
    if not request.HasField("occurred_at"):
        v.add("occurred_at", "is required")
    else:
        occurred_at = v.timestamp("occurred_at", request.occurred_at)
    metadata = v.metadata("metadata", request.metadata)
    v.raise_if_any()
    assert occurred_at is not None
    return NewPayment(
        id=payment_id,
        program=program,
        customer=customer_,
        amount=request.amount,
        currency=currency,
        occurred_at=occurred_at,
        metadata=metadata,
    )


def new_refund(request: points_pb2.RecordRefundRequest) -> NewRefund:
    v = Violations()
    refund_id = _external_id(v, "refund_id", request.refund_id)
    payment_id = _external_id(v, "payment_id", request.payment_id)
    if not 1 <= request.amount <= domain.programs.MAX_PAYMENT_AMOUNT:
        v.add("amount", f"must be between 1 and {domain.programs.MAX_PAYMENT_AMOUNT} (minor units)")
    v.raise_if_any()
    return NewRefund(id=refund_id, payment_id=payment_id, amount=request.amount)


def _external_id(v: Violations, field_path: str, value: str) -> str:
    """An id from another system (a payment's, a refund's): required, at most 255 characters."""
    if not value:
        v.add(field_path, "is required")
    return v.text(field_path, value, domain.payments.MAX_PAYMENT_ID_LENGTH)


def rule_version(request: programs_pb2.GetEarningRuleRequest) -> tuple[str, int | None]:
    v = Violations()
    rule_id = v.id("id", request.id, domain.ids.RULE_ID)
    if request.version < 0:
        v.add("version", "must not be negative (0: the latest)")
    v.raise_if_any()
    return rule_id, request.version or None


def program_status_filter(request: programs_pb2.ListProgramsRequest) -> ProgramStatus | None:
    v = Violations()
    status = v.enum("status", request.status, _PROGRAM_STATUS_FROM_PB, required=False)
    v.raise_if_any()
    return status


def account_filter(request: accounts_pb2.ListAccountsRequest) -> domain.accounts.AccountFilter:
    v = Violations()
    program = v.id("program", request.program, domain.ids.PROGRAM_ID, required=False)
    customer_ = customer(v, "customer", request.customer)
    status = v.enum("status", request.status, _STATUS_FROM_PB, required=False)
    v.raise_if_any()
    return domain.accounts.AccountFilter(program=program or None, customer=customer_, status=status)


def transaction_filter(
    request: points_pb2.ListPointsTransactionsRequest,
) -> domain.points.TransactionFilter:
    v = Violations()
    account = v.id("account", request.account, domain.ids.ACCOUNT_ID, required=False)
    type_ = v.enum("type", request.type, _TYPE_FROM_PB, required=False)
    direction = v.enum("direction", request.direction, _DIRECTION_FROM_PB, required=False)
    v.raise_if_any()
    return domain.points.TransactionFilter(account=account or None, type=type_, direction=direction)


def event_filter(
    v: Violations, program: str, account: str, types: Sequence[str], allowed: frozenset[EventType]
) -> EventFilter:
    """The filters of a subscription or list; no types means all of `allowed`."""
    program = v.id("program", program, domain.ids.PROGRAM_ID, required=False)
    account = v.id("account", account, domain.ids.ACCOUNT_ID, required=False)
    chosen = set()
    v.at_most("types", types, MAX_TYPE_FILTERS, "entries")
    for index, name in enumerate(types):
        if name in allowed:
            chosen.add(EventType(name))
        else:
            names = ", ".join(sorted(allowed))
            v.add(f"types[{index}]", f"{name[:100]!r} is not one of: {names}")
    return EventFilter(
        types=frozenset(chosen) or allowed, program=program or None, account=account or None
    )


# Entries of an event filter's `types` (there are fewer event types: a longer list repeats).
MAX_TYPE_FILTERS = 20


def single_id(field_path: str, value: str, pattern: re.Pattern[str]) -> str:
    v = Violations()
    v.id(field_path, value, pattern)
    v.raise_if_any()
    return value


# ---------------------------------------------------------------------------------------
# Resources.


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime) -> Timestamp:
    # Integer arithmetic on the timedelta: exact, and cheaper than FromDatetime on every read.
    since = value - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def program_pb(program: Program) -> programs_pb2.Program:
    return programs_pb2.Program(
        id=program.id,
        name=program.name,
        currency=program.currency,
        auto_enroll=program.auto_enroll,
        tiers=[
            programs_pb2.Tier(name=t.name, lifetime_points=t.lifetime_points) for t in program.tiers
        ],
        status=_PROGRAM_STATUS_TO_PB[program.status],
        create_time=timestamp(program.create_time),
        update_time=timestamp(program.update_time),
        earning_rules=[rule_pb(rule) for rule in program.earning_rules],
    )


def rule_pb(rule: EarningRule) -> programs_pb2.EarningRule:
    return programs_pb2.EarningRule(
        id=rule.id,
        version=rule.version,
        name=rule.name,
        trigger=_TRIGGER_TO_PB[rule.trigger],
        points_per_unit=rule.points_per_unit,
        min_amount=rule.min_amount,
        max_points=rule.max_points,
        tier_multipliers=[
            programs_pb2.TierMultiplier(tier=m.tier, multiplier=m.multiplier)
            for m in rule.tier_multipliers
        ],
        start_time=timestamp(rule.start_time) if rule.start_time else None,
        end_time=timestamp(rule.end_time) if rule.end_time else None,
        points=rule.points,
    )


def payment_result_pb(result: PaymentResult) -> points_pb2.RecordPaymentResponse:
    payment = result.payment
    return points_pb2.RecordPaymentResponse(
        payment=points_pb2.Payment(
            id=payment.id,
            program=payment.program,
            customer=payment.customer or "",
            amount=payment.amount,
            currency=payment.currency,
            occurred_at=timestamp(payment.occurred_at),
            metadata=payment.metadata,
            outcome=_OUTCOME_TO_PB[payment.outcome],
            account=payment.account or "",
            enrolled=payment.enrolled,
            create_time=timestamp(payment.create_time),
        ),
        points_transactions=[transaction_pb(ptx) for ptx in result.transactions],
        account=account_pb(result.account) if result.account else None,
    )


def refund_result_pb(result: RefundResult) -> points_pb2.RecordRefundResponse:
    refund = result.refund
    return points_pb2.RecordRefundResponse(
        refund=points_pb2.Refund(
            id=refund.id,
            payment_id=refund.payment_id,
            amount=refund.amount,
            refunded_amount=refund.refunded_amount,
            create_time=timestamp(refund.create_time),
        ),
        points_transactions=[transaction_pb(ptx) for ptx in result.transactions],
        account=account_pb(result.account) if result.account else None,
    )


def account_pb(account: Account) -> accounts_pb2.Account:
    return accounts_pb2.Account(
        id=account.id,
        program=account.program,
        customer=account.customer or "",
        status=_STATUS_TO_PB[account.status],
        balance=account.balance,
        lifetime_points=account.lifetime_points,
        tier=account.tier,
        metadata=account.metadata,
        create_time=timestamp(account.create_time),
        update_time=timestamp(account.update_time),
        merged_into=account.merged_into or "",
        version=account.version,
    )


def transaction_pb(ptx: PointsTransaction) -> points_pb2.PointsTransaction:
    return points_pb2.PointsTransaction(
        id=ptx.id,
        account=ptx.account,
        type=_TYPE_TO_PB[ptx.type],
        direction=_DIRECTION_TO_PB[ptx.direction],
        amount=ptx.amount,
        points_after=ptx.points_after,
        reason=ptx.reason,
        origin=points_pb2.Origin(kind=_ORIGIN_TO_PB[ptx.origin_kind], id=ptx.origin_id),
        reverses=ptx.reverses or "",
        original_account=ptx.original_account or "",
        metadata=ptx.metadata,
        create_time=timestamp(ptx.create_time),
        rule=ptx.rule or "",
        rule_version=ptx.rule_version or 0,
    )


def account_event_pb(event: Event) -> accounts_pb2.AccountEvent:
    assert isinstance(event.snapshot, Account)
    return accounts_pb2.AccountEvent(**_envelope(event), snapshot=account_pb(event.snapshot))


def transaction_event_pb(event: Event) -> points_pb2.TransactionEvent:
    assert isinstance(event.snapshot, PointsTransaction)
    return points_pb2.TransactionEvent(**_envelope(event), snapshot=transaction_pb(event.snapshot))


def _envelope(event: Event) -> dict[str, object]:
    """The fields AccountEvent and TransactionEvent share."""
    return {
        "id": event.id,
        "type": event.type.value,
        "create_time": timestamp(event.create_time),
        "position": event.position,
        "program": event.program,
        "account": event.account,
    }


def event_pb(event: Event) -> events_pb2.Event:
    if isinstance(event.snapshot, Account):
        return events_pb2.Event(account_event=account_event_pb(event))
    return events_pb2.Event(transaction_event=transaction_event_pb(event))


class EventEncoder:
    """Events as the `events` field of a stream response, encoded once each.

    SubscribeAccountEventsResponse and SubscribeTransactionEventsResponse are both
    `repeated <event> events = 1; int64 position = 2;`, so a response is the concatenation
    of its events' encoded fields and of its position's (stream_response). An event goes to
    every subscriber that wants it: encoding it once makes each further subscriber's share a
    copy of bytes. Live subscribers need an encoding for a moment only, so the cache is kept
    small: at ~200 events a second, 16 MiB holds the last minutes.
    """

    # What a cached entry costs besides its bytes: the bytes object and the dict entry.
    ENTRY_OVERHEAD = 120

    def __init__(self, capacity_bytes: int = 16 << 20) -> None:
        self._capacity = capacity_bytes
        self._size = 0
        self._fields: OrderedDict[int, bytes] = OrderedDict()  # by position

    def events_fields(self, events: list[Event]) -> list[bytes]:
        return [self._field(event) for event in events]

    def _field(self, event: Event) -> bytes:
        encoded = self._fields.get(event.position)
        if encoded is None:
            if isinstance(event.snapshot, Account):
                payload = account_event_pb(event).SerializeToString()
            else:
                payload = transaction_event_pb(event).SerializeToString()
            encoded = b"\x0a" + _varint(len(payload)) + payload  # field 1, length-delimited
            self._fields[event.position] = encoded
            self._size += len(encoded) + self.ENTRY_OVERHEAD
            while self._size > self._capacity:
                self._size -= len(self._fields.popitem(last=False)[1]) + self.ENTRY_OVERHEAD
        return encoded


def stream_response(events_fields: list[bytes], position: int) -> bytes:
    """A stream response's bytes: its events (EventEncoder.events_fields) and position."""
    if position:
        return b"".join([*events_fields, b"\x10", _varint(position)])  # field 2, varint
    return b"".join(events_fields)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ---------------------------------------------------------------------------------------
# Page tokens: opaque, signed, and bound to the query they continue.


class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def page_size(self, requested: int) -> int:
        if requested < 0:
            raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
        return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)

    def encode(self, after: int | None, query: object) -> str:
        if after is None:
            return ""
        body = _b64(json.dumps({"after": after, "query": domain.codec.digest(query)[:16]}).encode())
        return f"{body}.{self._sign(body)}"

    def decode(self, token: str, query: object) -> int | None:
        """The keyset position a token continues from; None for the first page."""
        if not token:
            return None
        body, _, signature = token.partition(".")
        # Bytes, not str: compare_digest refuses a str that is not ASCII.
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            raise _bad_token("is not a page token issued by this service")
        try:
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            after, digest = int(payload["after"]), payload["query"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise _bad_token("is malformed") from None
        if digest != domain.codec.digest(query)[:16]:
            raise _bad_token("belongs to a request with other filters")
        return after

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest()[:18])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _bad_token(description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", description)])
