"""Thin servicers: request -> use case -> response."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from . import convert, domain
from .convert import PageTokens, Violations
from .domain.ids import Page
from .errors import translated, translated_stream
from .events import EventFeed
from .ledger import Ledger
from .ledger.accounts import AccountChanges
from .pb import (
    accounts_pb2,
    accounts_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
)

Context = grpc.aio.ServicerContext
# Bytes of items in one list response: well under gRPC's default 4 MiB message limit on the
# client, as a page of 100 items with large metadata could be ~10 MB.
MAX_RESPONSE_BYTES = 1 << 20
T = TypeVar("T")
M = TypeVar("M", bound=Message)
F = TypeVar("F")


class LoyaltyPrograms(programs_pb2_grpc.LoyaltyProgramsServicer):
    def __init__(self, ledger: Ledger, tokens: PageTokens) -> None:
        self.ledger = ledger
        self.tokens = tokens

    @translated
    async def CreateProgram(
        self, request: programs_pb2.CreateProgramRequest, context: Context
    ) -> programs_pb2.Program:
        program_id, new = convert.new_program(request)
        program = await self.ledger.create_program(program_id, new, request.request_id)
        return convert.program_pb(program)

    @translated
    async def GetProgram(
        self, request: programs_pb2.GetProgramRequest, context: Context
    ) -> programs_pb2.Program:
        program_id = convert.single_id("id", request.id, domain.ids.PROGRAM_ID)
        return convert.program_pb(await self.ledger.get_program(program_id))

    @translated
    async def GetEarningRule(
        self, request: programs_pb2.GetEarningRuleRequest, context: Context
    ) -> programs_pb2.EarningRule:
        rule_id, version = convert.rule_version(request)
        return convert.rule_pb(await self.ledger.get_earning_rule(rule_id, version))

    @translated
    async def ListPrograms(
        self, request: programs_pb2.ListProgramsRequest, context: Context
    ) -> programs_pb2.ListProgramsResponse:
        status = convert.program_status_filter(request)
        items, next_page_token = await _page(
            self.tokens,
            request,
            "ListPrograms",
            status,
            self.ledger.list_programs,
            convert.program_pb,
        )
        return programs_pb2.ListProgramsResponse(programs=items, next_page_token=next_page_token)

    @translated
    async def UpdateProgram(
        self, request: programs_pb2.UpdateProgramRequest, context: Context
    ) -> programs_pb2.Program:
        program_id, changes = convert.program_changes(request)
        program = await self.ledger.update_program(program_id, changes, request.request_id)
        return convert.program_pb(program)


class LoyaltyAccounts(accounts_pb2_grpc.LoyaltyAccountsServicer):
    def __init__(self, ledger: Ledger, tokens: PageTokens, feed: EventFeed) -> None:
        self.ledger = ledger
        self.tokens = tokens
        self.feed = feed

    @translated
    async def CreateAccount(
        self, request: accounts_pb2.CreateAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        v = Violations()
        program = v.id("program", request.program, domain.ids.PROGRAM_ID)
        customer = convert.customer(v, "customer", request.customer)
        metadata = v.metadata("metadata", request.metadata)
        v.request_id(request.request_id)
        v.raise_if_any()
        account = await self.ledger.create_account(program, customer, metadata, request.request_id)
        return convert.account_pb(account)

    @translated
    async def GetAccount(
        self, request: accounts_pb2.GetAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        account_id = convert.single_id("id", request.id, domain.ids.ACCOUNT_ID)
        return convert.account_pb(await self.ledger.get_account(account_id))

    @translated
    async def UpdateAccount(
        self, request: accounts_pb2.UpdateAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        v = Violations()
        account_id = v.id("account.id", request.account.id, domain.ids.ACCOUNT_ID)
        paths = convert.update_paths(v, request.update_mask.paths, convert.ACCOUNT_PATHS)
        if not paths:
            # AIP-134: without a mask, update the fields that are set.
            paths = {"customer"} if request.account.customer else set()
            if request.account.metadata:
                paths.add("metadata")
        customer = convert.customer(v, "account.customer", request.account.customer)
        metadata = v.metadata("account.metadata", request.account.metadata)
        v.request_id(request.request_id)
        if not paths:
            v.add("update_mask", "names nothing to update")
        v.raise_if_any()
        changes = AccountChanges(
            customer=customer if "customer" in paths else None,
            clear_customer="customer" in paths and customer is None,
            metadata=metadata if "metadata" in paths else None,
        )
        account = await self.ledger.update_account(account_id, changes, request.request_id)
        return convert.account_pb(account)

    @translated
    async def ListAccounts(
        self, request: accounts_pb2.ListAccountsRequest, context: Context
    ) -> accounts_pb2.ListAccountsResponse:
        where = convert.account_filter(request)
        items, next_page_token = await _page(
            self.tokens,
            request,
            "ListAccounts",
            where,
            self.ledger.list_accounts,
            convert.account_pb,
        )
        return accounts_pb2.ListAccountsResponse(accounts=items, next_page_token=next_page_token)

    @translated
    async def CloseAccount(
        self, request: accounts_pb2.CloseAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        account_id = _id_and_request_id(request.id, request.request_id)
        account = await self.ledger.close_account(account_id, request.request_id)
        return convert.account_pb(account)

    @translated
    async def ReopenAccount(
        self, request: accounts_pb2.ReopenAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        account_id = _id_and_request_id(request.id, request.request_id)
        account = await self.ledger.reopen_account(account_id, request.request_id)
        return convert.account_pb(account)

    @translated
    async def MergeAccounts(
        self, request: accounts_pb2.MergeAccountsRequest, context: Context
    ) -> accounts_pb2.MergeAccountsResponse:
        v = Violations()
        source = v.id("source", request.source, domain.ids.ACCOUNT_ID)
        target = v.id("target", request.target, domain.ids.ACCOUNT_ID)
        v.request_id(request.request_id)
        v.raise_if_any()
        merged = await self.ledger.merge_accounts(source, target, request.request_id)
        return accounts_pb2.MergeAccountsResponse(
            target=convert.account_pb(merged.target), source=convert.account_pb(merged.source)
        )

    @translated_stream
    async def SubscribeAccountEvents(
        self, request: accounts_pb2.SubscribeAccountEventsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        # Responses go out as bytes (see server._add_servicer): SubscribeAccountEventsResponse.
        async for response in _subscribe(self.feed, request, domain.events.ACCOUNT_EVENT_TYPES):
            yield response


class PointsLedger(points_pb2_grpc.PointsLedgerServicer):
    def __init__(self, ledger: Ledger, tokens: PageTokens, feed: EventFeed) -> None:
        self.ledger = ledger
        self.tokens = tokens
        self.feed = feed

    @translated
    async def CreatePointsTransaction(
        self, request: points_pb2.CreatePointsTransactionRequest, context: Context
    ) -> points_pb2.PointsTransaction:
        new = convert.new_transaction(request)
        ptx = await self.ledger.create_transaction(new, request.request_id)
        return convert.transaction_pb(ptx)

    @translated
    async def GetPointsTransaction(
        self, request: points_pb2.GetPointsTransactionRequest, context: Context
    ) -> points_pb2.PointsTransaction:
        transaction_id = convert.single_id("id", request.id, domain.ids.TRANSACTION_ID)
        return convert.transaction_pb(await self.ledger.get_transaction(transaction_id))

    @translated
    async def ListPointsTransactions(
        self, request: points_pb2.ListPointsTransactionsRequest, context: Context
    ) -> points_pb2.ListPointsTransactionsResponse:
        where = convert.transaction_filter(request)
        items, next_page_token = await _page(
            self.tokens,
            request,
            "ListPointsTransactions",
            where,
            self.ledger.list_transactions,
            convert.transaction_pb,
        )
        return points_pb2.ListPointsTransactionsResponse(
            points_transactions=items, next_page_token=next_page_token
        )

    @translated
    async def RecordPayment(
        self, request: points_pb2.RecordPaymentRequest, context: Context
    ) -> points_pb2.RecordPaymentResponse:
        result = await self.ledger.record_payment(convert.new_payment(request))
        return convert.payment_result_pb(result)

    @translated
    async def RecordRefund(
        self, request: points_pb2.RecordRefundRequest, context: Context
    ) -> points_pb2.RecordRefundResponse:
        result = await self.ledger.record_refund(convert.new_refund(request))
        return convert.refund_result_pb(result)

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
            transaction_id, amount, reason, request.request_id
        )
        return convert.transaction_pb(reversal)

    @translated_stream
    async def SubscribeTransactionEvents(
        self, request: points_pb2.SubscribeTransactionEventsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        # Responses go out as bytes: SubscribeTransactionEventsResponse.
        async for response in _subscribe(self.feed, request, domain.events.TRANSACTION_EVENT_TYPES):
            yield response


class LoyaltyEvents(events_pb2_grpc.LoyaltyEventsServicer):
    def __init__(self, ledger: Ledger, tokens: PageTokens) -> None:
        self.ledger = ledger
        self.tokens = tokens

    @translated
    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: Context
    ) -> events_pb2.ListEventsResponse:
        v = Violations()
        where = convert.event_filter(
            v, request.program, request.account, request.types, frozenset(domain.events.EventType)
        )
        if request.after_position < 0:
            v.add("after_position", "must not be negative")
        v.raise_if_any()
        limit = self.tokens.page_size(request.page_size)
        types = sorted(where.types)
        query = ["ListEvents", where.program, where.account, types, request.after_position]
        after = self.tokens.decode(request.page_token, query)
        # A page token, or an explicit position, must still have all of its events.
        check = after is not None or request.after_position > 0
        page = await self.ledger.list_events(
            where, request.after_position if after is None else after, limit, check=check
        )
        events = _fit([convert.event_pb(e) for e in page.events])
        if len(events) == len(page.events):
            reached = page.reached
        else:
            reached = page.events[len(events) - 1].position
        # A full page, or one cut short (by size, or by the read's window), has more after.
        more = len(events) == limit or reached < page.head
        return events_pb2.ListEventsResponse(
            events=events,
            next_page_token=self.tokens.encode(reached if more else None, query),
            position=reached,
        )


async def _subscribe(
    feed: EventFeed,
    request: accounts_pb2.SubscribeAccountEventsRequest
    | points_pb2.SubscribeTransactionEventsRequest,
    types: frozenset[domain.events.EventType],
) -> AsyncIterator[bytes]:
    """A subscription's responses, as bytes, for either kind of event."""
    v = Violations()
    where = convert.event_filter(v, request.program, request.account, request.types, types)
    start = request.WhichOneof("start")
    if start == "after_position" and request.after_position < 0:
        v.add("after_position", "must not be negative")
    v.raise_if_any()
    after = await feed.start_position(
        request.after_position if start == "after_position" else None,
        # An explicit `from_oldest: false` selects the oneof field too: it means from now.
        from_oldest=start == "from_oldest" and request.from_oldest,
    )
    # The first response comes at once and carries the start position: from then on, the
    # subscriber misses nothing.
    yield convert.stream_response([], after)
    async for batch in feed.subscribe(where, after):
        yield convert.stream_response(batch.parts, batch.position)


async def _page(
    tokens: PageTokens,
    request: accounts_pb2.ListAccountsRequest
    | points_pb2.ListPointsTransactionsRequest
    | programs_pb2.ListProgramsRequest,
    method: str,
    where: F,
    list_page: Callable[[F, int | None, int], Awaitable[Page[T]]],
    to_pb: Callable[[T], M],
) -> tuple[list[M], str]:
    """One keyset page for a list request, as messages; its token is bound to the method and
    filters. A page cut short by size goes on, in the next, after its last item."""
    limit = tokens.page_size(request.page_size)
    query = [method, where]
    page = await list_page(where, tokens.decode(request.page_token, query), limit)
    messages = _fit([to_pb(item) for item in page.items])
    next_after = page.next_after
    if len(messages) < len(page.items):
        next_after = page.keys[len(messages) - 1]
    return messages, tokens.encode(next_after, query)


def _fit(messages: list[M]) -> list[M]:
    """The first messages that fit in one response (MAX_RESPONSE_BYTES), at least one."""
    size = 0
    for count, message in enumerate(messages):
        size += message.ByteSize()
        if count and size > MAX_RESPONSE_BYTES:
            return messages[:count]
    return messages


def _id_and_request_id(account_id: str, request_id: str) -> str:
    v = Violations()
    v.id("id", account_id, domain.ids.ACCOUNT_ID)
    v.request_id(request_id)
    v.raise_if_any()
    return account_id
