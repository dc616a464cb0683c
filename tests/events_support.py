"""Reading event streams in tests: a background thread per stream, so a test can wait for
what arrives with a timeout, and see exactly what arrived."""

from __future__ import annotations

import queue
import threading
import time

import grpc

from loyalty_service.pb import accounts_pb2, events_pb2, events_pb2_grpc, points_pb2
from tests.support import failure


class Stream:
    """A subscription whose responses a thread reads into a queue as they come."""

    def __init__(self, call) -> None:
        self.call = call
        self._responses: queue.Queue = queue.Queue()
        self.position = 0  # of the last response taken
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
        except grpc.RpcError as error:
            self._responses.put(error)
        else:
            self._responses.put(None)

    def next(self, timeout: float = 10):
        """The next response; raises the stream's error if it ended with one."""
        item = self._responses.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        assert item is not None, "the stream ended without an error"
        self.position = item.position
        return item

    def events(self, count: int, timeout: float = 20) -> list:
        """The next `count` events, in the order they came, across responses."""
        found: list = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            response = self.next(timeout=max(0.01, deadline - time.monotonic()))
            found += response.events
        assert len(found) == count, f"expected {count} events, got {len(found)}"
        return found

    def quiet(self, seconds: float) -> list:
        """Every event that arrives within `seconds` (heartbeats skipped)."""
        found: list = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                found += self.next(timeout=left).events
            except queue.Empty:
                break
        return found

    def error(self, timeout: float = 20):
        """Reads to the end of the stream; the failure it ended with."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.next(timeout=max(0.01, deadline - time.monotonic()))
            except grpc.RpcError as error:
                return failure(error)

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(timeout=10)


def transaction_events(points, **request) -> Stream:
    """Subscribes to transaction events and waits for the first response (the start)."""
    stream = Stream(
        points.SubscribeTransactionEvents(points_pb2.SubscribeTransactionEventsRequest(**request))
    )
    stream.next()
    return stream


def account_events(accounts, **request) -> Stream:
    stream = Stream(
        accounts.SubscribeAccountEvents(accounts_pb2.SubscribeAccountEventsRequest(**request))
    )
    stream.next()
    return stream


def all_events(channel, **request) -> list[events_pb2.Event]:
    """Every event ListEvents returns, page after page."""
    stub = events_pb2_grpc.LoyaltyEventsStub(channel)
    found, token = [], ""
    while True:
        page = stub.ListEvents(
            events_pb2.ListEventsRequest(page_size=100, page_token=token, **request)
        )
        found += page.events
        token = page.next_page_token
        if not token:
            return found


def event_of(event: events_pb2.Event):
    """The AccountEvent or TransactionEvent inside an Event."""
    return getattr(event, event.WhichOneof("event"))
