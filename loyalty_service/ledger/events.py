"""Use cases of the event log, and housekeeping."""

from __future__ import annotations

from datetime import timedelta

from .. import db, domain, store
from ..domain.events import EventFilter
from .requests import UseCases


class EventUseCases(UseCases):
    async def list_events(
        self, where: EventFilter, after: int, limit: int, *, check: bool
    ) -> store.events.EventPage:
        """A page of events after a position; with `check`, OUT_OF_RANGE unless every event
        after it is still retained."""
        async with db.connection(self.pool) as conn:
            page = await store.events.events_page(conn, where, after, limit)
        if check:
            domain.events.check_position(after, page.oldest, page.head)
        return page

    async def prune_events(self, keep: timedelta) -> int:
        """Deletes the events older than `keep`."""
        async with db.connection(self.pool) as conn:
            return await store.events.prune_events(conn, self.clock() - keep)

    # -- housekeeping --------------------------------------------------------------------

    async def prune_request_ids(self, keep: timedelta) -> int:
        """Forgets request ids older than `keep`; their retries would run again."""
        async with db.connection(self.pool) as conn:
            return await store.requests.prune_request_keys(conn, self.clock() - keep)
