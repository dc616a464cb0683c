"""Event delivery: tailing the event log and fanning new events out to subscribers.

Each server process has one EventFeed. It reads new events from the log (store.events.events_page)
when woken, by a PostgreSQL notification (every commit that appends events sends one; see
migration 0002) or by a timer (notifications are lost while nobody listens, e.g. while the
listening connection reconnects), and hands each to the subscriptions it matches. A
subscription first catches up from the table on its own, then joins the feed at a position
the feed has not passed yet, so that no event is missed or repeated at the seam.

The feed never waits for a subscriber: each has a bounded buffer, and one that falls too far
behind is ended (SubscriberTooSlow) and may resume from its last position. Events are
encoded once, however many subscribers receive them (see api.streams.EventEncoder).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import psycopg
from psycopg_pool import AsyncConnectionPool

from .. import db, domain, store
from ..domain.errors import LedgerError, ServerStopping, SubscriberTooSlow
from ..domain.events import Event, EventFilter
from .sequencer import settled

log = logging.getLogger(__name__)

EVERY_EVENT = EventFilter(types=frozenset(domain.events.EventType))


@dataclass(frozen=True)
class FeedSettings:
    # Seconds between reads of the log when no notification comes.
    poll_interval: float = 1.0
    # Seconds the feed waits after a read before the next one: under load, one read (and one
    # message per subscriber) then carries all the events that committed meanwhile.
    read_interval: float = 0.05
    # Events per read, and per catch-up page.
    page_size: int = 500
    # Events (and bytes) a subscription may have waiting to be sent before it is ended as
    # too slow: they bound the memory one costs.
    buffer_size: int = 10_000
    buffer_bytes: int = 32 << 20
    # Bytes of events in one response: well under gRPC's default 4 MiB message limit on
    # the client (an event is at most about 110 KB).
    max_response_bytes: int = 1 << 20
    # Seconds without anything to send after which a stream sends a heartbeat.
    heartbeat_interval: float = 15.0


# Encodes events for a stream response: one encoded `events` field per event.
Encode = Callable[[list[Event]], list[bytes]]


@dataclass(frozen=True)
class Encoded:
    """Events a stream wants, encoded one by one, with their positions."""

    positions: list[int]
    fields: list[bytes]
    size: int  # bytes

    @classmethod
    def of(cls, events: list[Event], encode: Encode) -> Encoded:
        fields = encode(events) if events else []
        return cls([e.position for e in events], fields, sum(map(len, fields)))


@dataclass(frozen=True)
class Batch:
    """What a stream sends in one response: encoded events (`parts`, to be joined) and the
    position reached with them, the position to resume after."""

    parts: list[bytes]
    position: int


class Subscription:
    """One stream's place in the feed: what it wants, and what waits to be sent to it."""

    def __init__(self, where: EventFilter, reached: int, settings: FeedSettings) -> None:
        self.where = where
        # Every matching event up to here is waiting in the buffer or was sent.
        self.reached = reached
        self.ended: LedgerError | None = None
        self._settings = settings
        # What waits: events read up to a position, and how many of them were sent already.
        self._waiting: deque[tuple[Encoded, int, int]] = deque()
        self._waiting_events = 0
        self._waiting_bytes = 0
        self._ready = asyncio.Event()

    def offer(self, encoded: Encoded, reached: int) -> None:
        """Takes the events it wants (encoded) of what the feed read up to `reached`; never
        blocks. One that already has events waiting and would go over its buffer is ended."""
        if self.ended is not None:
            return
        if encoded.fields:
            settings = self._settings
            # A read may bring more than the buffer holds; a subscriber that has sent what
            # came before is keeping up all the same.
            if self._waiting_events and (
                self._waiting_events + len(encoded.fields) > settings.buffer_size
                or self._waiting_bytes + encoded.size > settings.buffer_bytes
            ):
                self.end(
                    SubscriberTooSlow(
                        f"the subscriber fell more than {settings.buffer_size} events (or"
                        f" {settings.buffer_bytes} bytes) behind; resume after the last"
                        " position received",
                        bufferSize=settings.buffer_size,
                    )
                )
                return
            self._waiting.append((encoded, 0, max(reached, self.reached)))
            self._waiting_events += len(encoded.fields)
            self._waiting_bytes += encoded.size
            self._ready.set()
        self.reached = max(self.reached, reached)

    def end(self, error: LedgerError) -> None:
        self.ended = error
        self._waiting.clear()
        self._waiting_events = self._waiting_bytes = 0
        self._ready.set()

    @property
    def has_waiting(self) -> bool:
        return bool(self._waiting)

    async def next(self, heartbeat_interval: float) -> Batch:
        """What waits to be sent, or after heartbeat_interval seconds with nothing, an empty
        batch at the position reached: a heartbeat."""
        if not self._waiting and self.ended is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(heartbeat_interval):
                    await self._ready.wait()
        if self.ended is not None:
            raise self.ended
        return self.take()

    def take(self) -> Batch:
        """As much of what waits as one response may hold (at least one event)."""
        limit = self._settings.max_response_bytes
        parts: list[bytes] = []
        size, position = 0, self.reached
        while self._waiting and size < limit:
            encoded, sent, reached = self._waiting[0]
            end = sent
            while end < len(encoded.fields) and (
                not parts or size + len(encoded.fields[end]) <= limit
            ):
                parts.append(encoded.fields[end])
                size += len(encoded.fields[end])
                end += 1
            if end < len(encoded.fields):  # the response is full inside this read
                self._waiting[0] = (encoded, end, reached)
                position = encoded.positions[end - 1]
                break
            self._waiting.popleft()
            position = reached
        self._waiting_events -= len(parts)
        self._waiting_bytes -= size
        if not self._waiting:
            self._ready.clear()
            position = self.reached
        return Batch(parts, position)


class EventFeed:
    def __init__(
        self,
        pool: AsyncConnectionPool,
        database_url: str,
        settings: FeedSettings,
        encode: Encode,
    ) -> None:
        self.pool = pool
        self.database_url = database_url
        self.settings = settings
        self.encode = encode
        # Every event up to here has been offered to every subscription in the feed.
        self.head = 0
        self._subscriptions: set[Subscription] = set()
        self._wake = asyncio.Event()
        # Catch-up reads share the pool with the writes: at most half of it at a time.
        self._catching_up = asyncio.Semaphore(max(1, pool.max_size // 2))
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._read_continually()),
        ]

    async def close(self) -> None:
        """Ends every stream with ServerStopping, so clients resume on another replica."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription.end(_stopping())
        self._subscriptions.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- subscribing ---------------------------------------------------------------------

    async def start_position(self, after: int | None, from_oldest: bool) -> int:
        """The position a stream starts after: `after` if it is still valid, just before the
        oldest retained event, or (by default) the newest event: from now, after every
        event committed before the call."""
        if after is None:
            await settled(self.pool)
        async with db.connection(self.pool) as conn:
            page = await store.events.events_page(conn, EVERY_EVENT, 0, 0)
        if after is not None:
            domain.events.check_position(after, page.oldest, page.head)
            return after
        return page.oldest - 1 if from_oldest else page.head

    async def subscribe(self, where: EventFilter, after: int) -> AsyncIterator[Batch]:
        """Every event matching `where` after position `after`, in order, and then each new
        one as it commits; a heartbeat when there is nothing to send for a while."""
        settings = self.settings
        subscription = Subscription(where, after, settings)
        try:
            # Catch up from the table until a read reaches the feed's head; then join the
            # feed, which offers only what comes after that. It joins before it sends the
            # last page, so that a slow client cannot keep it catching up forever.
            while True:
                async with self._catching_up, db.connection(self.pool) as conn:
                    page = await store.events.events_page(
                        conn, where, subscription.reached, settings.page_size
                    )
                domain.events.check_position(subscription.reached, page.oldest, page.head)
                subscription.offer(Encoded.of(page.events, self.encode), page.reached)
                if self._closed:
                    raise _stopping()
                if page.reached == page.head and page.reached >= self.head:
                    if not self._subscriptions:
                        self.head = max(self.head, page.reached)
                    self._subscriptions.add(subscription)
                    self._wake.set()  # anything newer: read it now
                    break
                if not subscription.has_waiting:
                    # A window with nothing it wants: say how far the catch-up got, so a
                    # resume need not read it again.
                    yield Batch([], subscription.reached)
                while subscription.has_waiting:
                    yield subscription.take()
            while True:
                yield await subscription.next(settings.heartbeat_interval)
        finally:
            self._subscriptions.discard(subscription)

    # -- reading the log -----------------------------------------------------------------

    async def _read_continually(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._subscriptions:
                try:
                    await self._read_new_events()
                except Exception as error:  # the next wake-up or poll tries again
                    log.warning("could not read the event log: %s", error)
                    await asyncio.sleep(self.settings.poll_interval)
            await asyncio.sleep(self.settings.read_interval)

    async def _read_new_events(self) -> None:
        while self._subscriptions:
            async with db.connection(self.pool) as conn:
                page = await store.events.events_page(
                    conn, EVERY_EVENT, self.head, self.settings.page_size
                )
            if page.oldest > self.head + 1:
                # Retention pruned events nobody here has read: no subscriber may go on as if
                # it had them. (Only a feed that fell a whole retention period behind.)
                for subscription in self._subscriptions:
                    subscription.end(domain.events.position_expired(self.head, page.oldest))
                self._subscriptions.clear()
                self.head = page.oldest - 1
                return
            self._offer(page.events, page.reached)
            self.head = max(self.head, page.reached)
            if len(page.events) < self.settings.page_size:
                return

    def _offer(self, events: list[Event], reached: int) -> None:
        """Offers each subscription what it wants of `events`. Subscriptions with the same
        filters (typically many) share one list and one encoding, so the cost of each one
        more subscriber is a queue entry, not a pass over the events."""
        shared: dict[EventFilter, Encoded] = {}
        by_account: dict[str, list[Event]] = {}
        if any(s.where.account for s in self._subscriptions):
            for event in events:
                by_account.setdefault(event.account, []).append(event)
        first = events[0].position if events else reached + 1
        for subscription in list(self._subscriptions):
            where = subscription.where
            candidates = by_account.get(where.account, []) if where.account else events
            if subscription.reached < first:  # as nearly always: it wants all it matches
                if where not in shared:
                    shared[where] = self._matching(where, candidates)
                encoded = shared[where]
            else:  # joined after the read began: only what comes after its position
                later = [e for e in candidates if e.position > subscription.reached]
                encoded = self._matching(where, later)
            subscription.offer(encoded, reached)
            if subscription.ended is not None:
                self._subscriptions.discard(subscription)

    def _matching(self, where: EventFilter, events: list[Event]) -> Encoded:
        matching = [e for e in events if where.matches(e)]
        return Encoded.of(matching, self.encode)

    async def _listen(self) -> None:
        """LISTENs on its own connection; wakes the reader on every notification, and once
        the LISTEN is in place (for whatever committed while nobody listened)."""
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    db.libpq_url(self.database_url),
                    autocommit=True,
                    application_name="loyalty-events-listener",
                )
                async with conn:
                    await store.events.listen_for_events(conn)
                    self._wake.set()
                    async for _ in conn.notifies():
                        self._wake.set()
            except Exception as error:  # reconnect; meanwhile the reader polls
                log.warning("event notifications lost, reconnecting: %s", error)
            await asyncio.sleep(min(self.settings.poll_interval, 1.0))


def _stopping() -> ServerStopping:
    return ServerStopping("the server is stopping; resume on another replica")
