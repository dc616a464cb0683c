"""Server streams: a subscription's responses, and their raw encoding (encoded once each)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator

from .. import domain
from ..domain.accounts import Account
from ..domain.callers import Caller
from ..domain.events import Event
from ..domain.holds import Hold
from ..ledger import Ledger
from ..ledger.feed import EventFeed
from ..pb import accounts_pb2, points_pb2
from .messages import account_event_pb, hold_event_pb, transaction_event_pb
from .parsing import Violations, event_filter


async def subscribe(
    feed: EventFeed,
    ledger: Ledger,
    caller: Caller,
    request: accounts_pb2.SubscribeAccountEventsRequest
    | points_pb2.SubscribeTransactionEventsRequest
    | points_pb2.SubscribeHoldEventsRequest,
    types: frozenset[domain.events.EventType],
) -> AsyncIterator[bytes]:
    """A subscription's responses, as bytes, for either kind of event."""
    v = Violations()
    where = event_filter(v, request.program, request.account, request.types, types)
    start = request.WhichOneof("start")
    if start == "after_position" and request.after_position < 0:
        v.add("after_position", "must not be negative")
    v.raise_if_any()
    await ledger.allow_events(caller, where)
    after = await feed.start_position(
        request.after_position if start == "after_position" else None,
        # An explicit `from_oldest: false` selects the oneof field too: it means from now.
        from_oldest=start == "from_oldest" and request.from_oldest,
    )
    # The first response comes at once and carries the start position: from then on, the
    # subscriber misses nothing.
    yield stream_response([], after)
    async for batch in feed.subscribe(where, after):
        yield stream_response(batch.parts, batch.position)


class EventEncoder:
    """Events as the `events` field of a stream response, encoded once each.

    SubscribeAccountEventsResponse, SubscribeTransactionEventsResponse and
    SubscribeHoldEventsResponse are all
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
            elif isinstance(event.snapshot, Hold):
                payload = hold_event_pb(event).SerializeToString()
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
