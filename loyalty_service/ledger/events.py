"""Use cases of the event log, and housekeeping."""

from __future__ import annotations

from datetime import timedelta

from .. import domain, store
from ..domain.events import EventFilter
from .requests import UseCases
from .sequencer import settled


class EventUseCases(UseCases):
    async def list_events(
        self, where: EventFilter, after: int, limit: int, *, check: bool
    ) -> store.events.EventPage:
        """A page of events after a position; with `check`, OUT_OF_RANGE unless every event
        after it is still retained. It shows every event committed before the call."""
        await settled(self.pool)
        page = await self.call(store.events.events_page, where, after, limit)
        if check:
            domain.events.check_position(after, page.oldest, page.head)
        return page

    async def prune_events(self, keep: timedelta) -> int:
        """Deletes the events older than `keep`."""
        return await self.call(store.events.prune_events, self.clock() - keep)

    # -- housekeeping --------------------------------------------------------------------

    async def prune_request_ids(self, keep: timedelta) -> int:
        """Forgets request ids older than `keep`; their retries would run again."""
        return await self.call(store.requests.prune_request_keys, self.clock() - keep)
