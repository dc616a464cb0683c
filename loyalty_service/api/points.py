"""The PointsLedger servicer, and the parsing of its requests."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from .. import domain
from ..domain.callers import Scope
from ..domain.holds import HoldFilter, NewHold
from ..domain.payments import NewPayment, NewRefund
from ..domain.points import OriginKind, TransactionType
from ..ledger import Ledger
from ..ledger.feed import EventFeed
from ..pb import points_pb2, points_pb2_grpc
from . import callers, messages, paging, parsing, streams
from .errors import translated, translated_stream
from .paging import PageTokens
from .parsing import Violations

Context = grpc.aio.ServicerContext

_TYPE_FROM_PB = {v: k for k, v in messages.TYPE_TO_PB.items()}
_DIRECTION_FROM_PB = {v: k for k, v in messages.DIRECTION_TO_PB.items()}
_ORIGIN_FROM_PB = {v: k for k, v in messages.ORIGIN_TO_PB.items()}
_CREATE_POINTS_TRANSACTION = "/vinr.loyalty.v1.PointsLedger/CreatePointsTransaction"
# Origins only the service writes.
_RESERVED_ORIGINS = (OriginKind.MERGE, OriginKind.REFUND)


@dataclass(frozen=True)
class PointsLedger(points_pb2_grpc.PointsLedgerServicer):
    ledger: Ledger
    tokens: PageTokens
    feed: EventFeed

    @translated
    async def CreatePointsTransaction(
        self, request: points_pb2.CreatePointsTransactionRequest, context: Context
    ) -> points_pb2.PointsTransaction:
        new = new_transaction(request)
        caller = callers.current()
        if new.type in (TransactionType.ADJUST, TransactionType.EXPIRE):  # by hand
            callers.require(caller, Scope.POINTS_ADJUST, _CREATE_POINTS_TRANSACTION)
        ptx = await self.ledger.create_transaction(caller, new, request.request_id)
        return messages.transaction_pb(ptx)

    @translated
    async def GetPointsTransaction(
        self, request: points_pb2.GetPointsTransactionRequest, context: Context
    ) -> points_pb2.PointsTransaction:
        transaction_id = parsing.single_id("id", request.id, domain.ids.TRANSACTION_ID)
        return messages.transaction_pb(
            await self.ledger.get_transaction(callers.current(), transaction_id)
        )

    @translated
    async def ListPointsTransactions(
        self, request: points_pb2.ListPointsTransactionsRequest, context: Context
    ) -> points_pb2.ListPointsTransactionsResponse:
        where = transaction_filter(request)
        items, next_page_token = await paging.page(
            self.tokens,
            request,
            "ListPointsTransactions",
            where,
            functools.partial(self.ledger.list_transactions, callers.current()),
            messages.transaction_pb,
        )
        return points_pb2.ListPointsTransactionsResponse(
            points_transactions=items, next_page_token=next_page_token
        )

    @translated
    async def RecordPayment(
        self, request: points_pb2.RecordPaymentRequest, context: Context
    ) -> points_pb2.RecordPaymentResponse:
        result = await self.ledger.record_payment(callers.current(), new_payment(request))
        return messages.payment_result_pb(result)

    @translated
    async def RecordRefund(
        self, request: points_pb2.RecordRefundRequest, context: Context
    ) -> points_pb2.RecordRefundResponse:
        result = await self.ledger.record_refund(callers.current(), new_refund(request))
        return messages.refund_result_pb(result)

    @translated
    async def ReversePointsTransaction(
        self, request: points_pb2.ReversePointsTransactionRequest, context: Context
    ) -> points_pb2.PointsTransaction:
        v = Violations()
        transaction_id = v.id("id", request.id, domain.ids.TRANSACTION_ID)
        amount = v.amount("amount", request.amount) if request.HasField("amount") else None
        reason = v.text("reason", request.reason, domain.points.MAX_REASON_LENGTH)
        v.request_id(request.request_id)
        v.raise_if_any()
        reversal = await self.ledger.reverse_transaction(
            callers.current(), transaction_id, amount, reason, request.request_id
        )
        return messages.transaction_pb(reversal)

    @translated_stream
    async def SubscribeTransactionEvents(
        self, request: points_pb2.SubscribeTransactionEventsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        # Responses go out as bytes: SubscribeTransactionEventsResponse.
        async for response in streams.subscribe(
            self.feed,
            self.ledger,
            callers.current(),
            request,
            domain.events.TRANSACTION_EVENT_TYPES,
        ):
            yield response

    @translated
    async def CreateHold(
        self, request: points_pb2.CreateHoldRequest, context: Context
    ) -> points_pb2.Hold:
        return messages.hold_pb(await self.ledger.create_hold(callers.current(), new_hold(request)))

    @translated
    async def CaptureHold(
        self, request: points_pb2.CaptureHoldRequest, context: Context
    ) -> points_pb2.Hold:
        v = Violations()
        hold_id = v.id("id", request.id, domain.ids.HOLD_ID)
        amount = v.amount("amount", request.amount) if request.HasField("amount") else None
        v.request_id(request.request_id)
        v.raise_if_any()
        hold = await self.ledger.capture_hold(
            callers.current(), hold_id, amount, request.request_id
        )
        return messages.hold_pb(hold)

    @translated
    async def ReleaseHold(
        self, request: points_pb2.ReleaseHoldRequest, context: Context
    ) -> points_pb2.Hold:
        v = Violations()
        hold_id = v.id("id", request.id, domain.ids.HOLD_ID)
        v.request_id(request.request_id)
        v.raise_if_any()
        hold = await self.ledger.release_hold(callers.current(), hold_id, request.request_id)
        return messages.hold_pb(hold)

    @translated
    async def GetHold(
        self, request: points_pb2.GetHoldRequest, context: Context
    ) -> points_pb2.Hold:
        hold_id = parsing.single_id("id", request.id, domain.ids.HOLD_ID)
        return messages.hold_pb(await self.ledger.get_hold(callers.current(), hold_id))

    @translated
    async def ListHolds(
        self, request: points_pb2.ListHoldsRequest, context: Context
    ) -> points_pb2.ListHoldsResponse:
        v = Violations()
        account = v.id("account", request.account, domain.ids.ACCOUNT_ID, required=False)
        v.raise_if_any()
        items, next_page_token = await paging.page(
            self.tokens,
            request,
            "ListHolds",
            HoldFilter(account=account or None),
            functools.partial(self.ledger.list_holds, callers.current()),
            messages.hold_pb,
        )
        return points_pb2.ListHoldsResponse(holds=items, next_page_token=next_page_token)

    @translated_stream
    async def SubscribeHoldEvents(
        self, request: points_pb2.SubscribeHoldEventsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        # Responses go out as bytes: SubscribeHoldEventsResponse.
        async for response in streams.subscribe(
            self.feed, self.ledger, callers.current(), request, domain.events.HOLD_EVENT_TYPES
        ):
            yield response


def new_hold(request: points_pb2.CreateHoldRequest) -> NewHold:
    v = Violations()
    account = v.id("account", request.account, domain.ids.ACCOUNT_ID)
    amount = v.amount("amount", request.amount)
    if not request.reference:
        v.add("reference", "is required")
    reference = v.text("reference", request.reference, domain.holds.MAX_REFERENCE_LENGTH)
    reason = v.text("reason", request.reason, domain.points.MAX_REASON_LENGTH)
    metadata = v.metadata("metadata", request.metadata)
    ttl_seconds = v.ttl("ttl", request.ttl) if request.HasField("ttl") else None
    v.raise_if_any()
    return NewHold(account, amount, reference, reason, metadata, ttl_seconds)


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
    if origin_kind is OriginKind.REDEMPTION and domain.ids.HOLD_ID.fullmatch(origin_id):
        # A capture's REDEEM is the only one of its hold (loyalty-service check).
        v.add("origin.id", "hold ids are reserved for CaptureHold's redemptions")
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


def new_payment(request: points_pb2.RecordPaymentRequest) -> NewPayment:
    v = Violations()
    payment_id = _external_id(v, "payment_id", request.payment_id)
    program = v.id("program", request.program, domain.ids.PROGRAM_ID)
    customer_ = parsing.customer(v, "customer", request.customer)
    _payment_amount(v, request.amount)
    currency = parsing.currency(v, "currency", request.currency)
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
    _payment_amount(v, request.amount)
    v.raise_if_any()
    return NewRefund(id=refund_id, payment_id=payment_id, amount=request.amount)


def _external_id(v: Violations, field_path: str, value: str) -> str:
    """An id from another system (a payment's, a refund's): required, at most 255 characters."""
    if not value:
        v.add(field_path, "is required")
    return v.text(field_path, value, domain.payments.MAX_PAYMENT_ID_LENGTH)


def _payment_amount(v: Violations, value: int) -> None:
    """A payment's or a refund's amount: in minor units, at most MAX_PAYMENT_AMOUNT."""
    if not 1 <= value <= domain.programs.MAX_PAYMENT_AMOUNT:
        v.add("amount", f"must be between 1 and {domain.programs.MAX_PAYMENT_AMOUNT} (minor units)")


def transaction_filter(
    request: points_pb2.ListPointsTransactionsRequest,
) -> domain.points.TransactionFilter:
    v = Violations()
    account = v.id("account", request.account, domain.ids.ACCOUNT_ID, required=False)
    type_ = v.enum("type", request.type, _TYPE_FROM_PB, required=False)
    direction = v.enum("direction", request.direction, _DIRECTION_FROM_PB, required=False)
    v.raise_if_any()
    return domain.points.TransactionFilter(account=account or None, type=type_, direction=direction)
