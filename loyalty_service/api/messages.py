"""Domain -> proto: the resources and events the servicers send, and their timestamps."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ..domain.accounts import Account, AccountStatus
from ..domain.events import Event
from ..domain.holds import Hold, HoldStatus
from ..domain.payments import Payment, PaymentOutcome, PaymentResult, Refund, RefundResult
from ..domain.points import Direction, OriginKind, PointsTransaction, TransactionType
from ..domain.programs import EarningRule, Program, ProgramStatus, RuleTrigger
from ..pb import accounts_pb2, events_pb2, points_pb2, programs_pb2

AccountPb = accounts_pb2.Account
TransactionPb = points_pb2.PointsTransaction
OriginPb = points_pb2.Origin
ProgramPb = programs_pb2.Program

STATUS_TO_PB = {s: AccountPb.Status.Value(f"STATUS_{s.value}") for s in AccountStatus}
TYPE_TO_PB = {t: TransactionPb.Type.Value(f"TYPE_{t.value}") for t in TransactionType}
DIRECTION_TO_PB = {d: TransactionPb.Direction.Value(f"DIRECTION_{d.value}") for d in Direction}
ORIGIN_TO_PB = {k: OriginPb.Kind.Value(f"KIND_{k.value}") for k in OriginKind}
PROGRAM_STATUS_TO_PB = {s: ProgramPb.Status.Value(f"STATUS_{s.value}") for s in ProgramStatus}
RulePb = programs_pb2.EarningRule
TRIGGER_TO_PB = {
    RuleTrigger.PAYMENT_COMPLETED: RulePb.TRIGGER_PAYMENT_COMPLETED,
    RuleTrigger.ACCOUNT_CREATED: RulePb.TRIGGER_ACCOUNT_CREATED,
}
PaymentPb = points_pb2.Payment
_OUTCOME_TO_PB = {o: PaymentPb.Outcome.Value(f"OUTCOME_{o.value}") for o in PaymentOutcome}


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
        status=PROGRAM_STATUS_TO_PB[program.status],
        create_time=timestamp(program.create_time),
        update_time=timestamp(program.update_time),
        earning_rules=[rule_pb(rule) for rule in program.earning_rules],
        actor=program.actor,
        hold_policy=programs_pb2.HoldPolicy(
            default_ttl=Duration(seconds=program.hold_policy.default_ttl_seconds),
            max_ttl=Duration(seconds=program.hold_policy.max_ttl_seconds),
        ),
    )


def rule_pb(rule: EarningRule) -> programs_pb2.EarningRule:
    return programs_pb2.EarningRule(
        id=rule.id,
        version=rule.version,
        name=rule.name,
        trigger=TRIGGER_TO_PB[rule.trigger],
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
    return points_pb2.RecordPaymentResponse(payment=payment_pb(result.payment), **_posted(result))


def refund_result_pb(result: RefundResult) -> points_pb2.RecordRefundResponse:
    return points_pb2.RecordRefundResponse(refund=refund_pb(result.refund), **_posted(result))


def _posted(result: PaymentResult | RefundResult) -> dict[str, object]:
    """The fields RecordPaymentResponse and RecordRefundResponse share: what was posted."""
    return {
        "points_transactions": [transaction_pb(ptx) for ptx in result.transactions],
        "account": account_pb(result.account) if result.account else None,
    }


def payment_pb(payment: Payment) -> points_pb2.Payment:
    return points_pb2.Payment(
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
        actor=payment.actor,
    )


def refund_pb(refund: Refund) -> points_pb2.Refund:
    return points_pb2.Refund(
        id=refund.id,
        payment_id=refund.payment_id,
        amount=refund.amount,
        refunded_amount=refund.refunded_amount,
        create_time=timestamp(refund.create_time),
        actor=refund.actor,
    )


def account_pb(account: Account) -> accounts_pb2.Account:
    return accounts_pb2.Account(
        id=account.id,
        program=account.program,
        customer=account.customer or "",
        status=STATUS_TO_PB[account.status],
        balance=account.balance,
        lifetime_points=account.lifetime_points,
        tier=account.tier,
        metadata=account.metadata,
        create_time=timestamp(account.create_time),
        update_time=timestamp(account.update_time),
        merged_into=account.merged_into or "",
        version=account.version,
        actor=account.actor,
        held_points=account.held_points,
        available_balance=account.available_balance,
    )


def transaction_pb(ptx: PointsTransaction) -> points_pb2.PointsTransaction:
    return points_pb2.PointsTransaction(
        id=ptx.id,
        account=ptx.account,
        type=TYPE_TO_PB[ptx.type],
        direction=DIRECTION_TO_PB[ptx.direction],
        amount=ptx.amount,
        points_after=ptx.points_after,
        reason=ptx.reason,
        origin=points_pb2.Origin(kind=ORIGIN_TO_PB[ptx.origin_kind], id=ptx.origin_id),
        reverses=ptx.reverses or "",
        original_account=ptx.original_account or "",
        metadata=ptx.metadata,
        create_time=timestamp(ptx.create_time),
        rule=ptx.rule or "",
        rule_version=ptx.rule_version or 0,
        actor=ptx.actor,
    )


def account_event_pb(event: Event) -> accounts_pb2.AccountEvent:
    assert isinstance(event.snapshot, Account)
    return accounts_pb2.AccountEvent(**_envelope(event), snapshot=account_pb(event.snapshot))


def transaction_event_pb(event: Event) -> points_pb2.TransactionEvent:
    assert isinstance(event.snapshot, PointsTransaction)
    return points_pb2.TransactionEvent(**_envelope(event), snapshot=transaction_pb(event.snapshot))


HOLD_STATUS_TO_PB = {
    HoldStatus.HELD: points_pb2.Hold.STATUS_HELD,
    HoldStatus.CAPTURED: points_pb2.Hold.STATUS_CAPTURED,
    HoldStatus.RELEASED: points_pb2.Hold.STATUS_RELEASED,
    HoldStatus.EXPIRED: points_pb2.Hold.STATUS_EXPIRED,
}


def hold_pb(hold: Hold) -> points_pb2.Hold:
    return points_pb2.Hold(
        id=hold.id,
        account=hold.account,
        original_account=hold.original_account or "",
        program=hold.program,
        reference=hold.reference,
        amount=hold.amount,
        captured_amount=hold.captured_amount,
        status=HOLD_STATUS_TO_PB[hold.status],
        reason=hold.reason,
        metadata=hold.metadata,
        create_time=timestamp(hold.create_time),
        expire_time=timestamp(hold.expire_time),
        capture_time=timestamp(hold.capture_time) if hold.capture_time else None,
        release_time=timestamp(hold.release_time) if hold.release_time else None,
        capture_transaction=hold.capture_transaction or "",
        account_version=hold.account_version,
        actor=hold.actor,
        captured_by=hold.captured_by or "",
        released_by=hold.released_by or "",
    )


def hold_event_pb(event: Event) -> points_pb2.HoldEvent:
    assert isinstance(event.snapshot, Hold)
    return points_pb2.HoldEvent(**_envelope(event), snapshot=hold_pb(event.snapshot))


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
    if isinstance(event.snapshot, Hold):
        return events_pb2.Event(hold_event=hold_event_pb(event))
    return events_pb2.Event(transaction_event=transaction_event_pb(event))
