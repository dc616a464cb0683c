"""The LoyaltyAccounts servicer, and the parsing of its requests."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from .. import domain
from ..ledger import Ledger
from ..ledger.accounts import AccountChanges
from ..ledger.feed import EventFeed
from ..pb import accounts_pb2, accounts_pb2_grpc
from . import callers, messages, paging, parsing, streams
from .errors import translated, translated_stream
from .paging import PageTokens
from .parsing import Violations

Context = grpc.aio.ServicerContext

_STATUS_FROM_PB = {v: k for k, v in messages.STATUS_TO_PB.items()}
# The fields UpdateAccount may change (AIP-134 paths).
ACCOUNT_PATHS = ("customer", "metadata")


@dataclass(frozen=True)
class LoyaltyAccounts(accounts_pb2_grpc.LoyaltyAccountsServicer):
    ledger: Ledger
    tokens: PageTokens
    feed: EventFeed

    @translated
    async def CreateAccount(
        self, request: accounts_pb2.CreateAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        v = Violations()
        program = v.id("program", request.program, domain.ids.PROGRAM_ID)
        customer = parsing.customer(v, "customer", request.customer)
        metadata = v.metadata("metadata", request.metadata)
        v.request_id(request.request_id)
        v.raise_if_any()
        account = await self.ledger.create_account(
            callers.current(), program, customer, metadata, request.request_id
        )
        return messages.account_pb(account)

    @translated
    async def GetAccount(
        self, request: accounts_pb2.GetAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        account_id = parsing.single_id("id", request.id, domain.ids.ACCOUNT_ID)
        return messages.account_pb(await self.ledger.get_account(callers.current(), account_id))

    @translated
    async def UpdateAccount(
        self, request: accounts_pb2.UpdateAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        v = Violations()
        account_id = v.id("account.id", request.account.id, domain.ids.ACCOUNT_ID)
        paths = parsing.update_paths(v, request.update_mask.paths, ACCOUNT_PATHS)
        if not paths:
            # AIP-134: without a mask, update the fields that are set.
            paths = {"customer"} if request.account.customer else set()
            if request.account.metadata:
                paths.add("metadata")
        customer = parsing.customer(v, "account.customer", request.account.customer)
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
        account = await self.ledger.update_account(
            callers.current(), account_id, changes, request.request_id
        )
        return messages.account_pb(account)

    @translated
    async def ListAccounts(
        self, request: accounts_pb2.ListAccountsRequest, context: Context
    ) -> accounts_pb2.ListAccountsResponse:
        where = account_filter(request)
        items, next_page_token = await paging.page(
            self.tokens,
            request,
            "ListAccounts",
            where,
            functools.partial(self.ledger.list_accounts, callers.current()),
            messages.account_pb,
        )
        return accounts_pb2.ListAccountsResponse(accounts=items, next_page_token=next_page_token)

    @translated
    async def CloseAccount(
        self, request: accounts_pb2.CloseAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        return await _status_change(
            request, functools.partial(self.ledger.close_account, callers.current())
        )

    @translated
    async def ReopenAccount(
        self, request: accounts_pb2.ReopenAccountRequest, context: Context
    ) -> accounts_pb2.Account:
        return await _status_change(
            request, functools.partial(self.ledger.reopen_account, callers.current())
        )

    @translated
    async def MergeAccounts(
        self, request: accounts_pb2.MergeAccountsRequest, context: Context
    ) -> accounts_pb2.MergeAccountsResponse:
        v = Violations()
        source = v.id("source", request.source, domain.ids.ACCOUNT_ID)
        target = v.id("target", request.target, domain.ids.ACCOUNT_ID)
        v.request_id(request.request_id)
        v.raise_if_any()
        merged = await self.ledger.merge_accounts(
            callers.current(), source, target, request.request_id
        )
        return accounts_pb2.MergeAccountsResponse(
            target=messages.account_pb(merged.target), source=messages.account_pb(merged.source)
        )

    @translated_stream
    async def SubscribeAccountEvents(
        self, request: accounts_pb2.SubscribeAccountEventsRequest, context: Context
    ) -> AsyncIterator[bytes]:
        # Responses go out as bytes (see server._add_servicer): SubscribeAccountEventsResponse.
        async for response in streams.subscribe(
            self.feed, self.ledger, callers.current(), request, domain.events.ACCOUNT_EVENT_TYPES
        ):
            yield response


def account_filter(request: accounts_pb2.ListAccountsRequest) -> domain.accounts.AccountFilter:
    v = Violations()
    program = v.id("program", request.program, domain.ids.PROGRAM_ID, required=False)
    customer_ = parsing.customer(v, "customer", request.customer)
    status = v.enum("status", request.status, _STATUS_FROM_PB, required=False)
    v.raise_if_any()
    return domain.accounts.AccountFilter(program=program or None, customer=customer_, status=status)


async def _status_change(
    request: accounts_pb2.CloseAccountRequest | accounts_pb2.ReopenAccountRequest,
    change: Callable[[str, str], Awaitable[domain.accounts.Account]],
) -> accounts_pb2.Account:
    """CloseAccount and ReopenAccount: the same request (an id and a request id), and the
    account after the `change`."""
    v = Violations()
    v.id("id", request.id, domain.ids.ACCOUNT_ID)
    v.request_id(request.request_id)
    v.raise_if_any()
    return messages.account_pb(await change(request.id, request.request_id))
