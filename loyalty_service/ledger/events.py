"""Use cases of the event log, and housekeeping."""

from __future__ import annotations

from datetime import timedelta

from .. import domain, store
from ..domain.callers import LIMITED_CALLER, Caller
from ..domain.errors import FieldViolation
from ..domain.events import EventFilter
from .requests import UseCases, program_not_found, raise_if_any
from .sequencer import settled


class EventUseCases(UseCases):
    async def allow_events(self, caller: Caller, where: EventFilter) -> None:
        """Raises unless the caller may read the events `where` selects: a caller limited to
        some programs names one of them, or an account of one."""
        if caller.programs is None:
            return
        if where.program is not None and not caller.sees(where.program):
            raise program_not_found(where.program)
        if where.account is not None:
            await self.require_account(caller, where.account)
        elif where.program is None:
            raise_if_any([FieldViolation("program", LIMITED_CALLER)])

    async def list_events(
        self, caller: Caller, where: EventFilter, after: int, limit: int, *, check: bool
    ) -> store.events.EventPage:
        """A page of events after a position; with `check`, OUT_OF_RANGE unless every event
        after it is still retained. It shows every event committed before the call."""
        await self.allow_events(caller, where)
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
