"""The LoyaltyEvents servicer, and the event filter of every event request."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from .. import domain
from ..ledger import Ledger
from ..pb import events_pb2, events_pb2_grpc
from . import callers, messages, paging, parsing
from .errors import translated
from .paging import PageTokens
from .parsing import Violations

Context = grpc.aio.ServicerContext


@dataclass(frozen=True)
class LoyaltyEvents(events_pb2_grpc.LoyaltyEventsServicer):
    ledger: Ledger
    tokens: PageTokens

    @translated
    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: Context
    ) -> events_pb2.ListEventsResponse:
        v = Violations()
        where = parsing.event_filter(
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
            callers.current(),
            where,
            request.after_position if after is None else after,
            limit,
            check=check,
        )
        events = paging.fit([messages.event_pb(e) for e in page.events])
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
