"""Group commit: calls that arrive while a batch runs wait, and run together in the next."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from psycopg_pool import PoolTimeout

from .. import db

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")


class Batches(Generic[Item, Result]):
    """Group commit: calls that arrive while a batch runs wait, and run together in the next.

    A call that finds nothing running starts a batch of its own at once, so an idle service
    answers as fast as without batching; under load one statement and one commit serve many
    calls, which is what lets two cores keep up (docs/benchmarks.md). One batch runs at a
    time. `keys` names what may appear only once in a batch (for postings: the request
    key); a call whose keys are taken waits for a later batch. When
    `max_waiting` calls wait already, `submit` returns None and the caller goes alone, so
    the queue (and the work of forming a batch from it) stays bounded.

    A call waits to be taken into a batch, and its batch waits for a connection, no longer
    than the call's deadline (db.call_deadline) or `max_wait` seconds, whichever is sooner:
    during an outage calls fail in time instead of queueing behind each other's waits.
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[list[Result]]],
        keys: Callable[[Item], tuple[object, ...]],
        max_size: int = 100,
        max_waiting: int = 500,
        max_wait: float = float("inf"),
    ) -> None:
        self._run = run
        self._keys = keys
        self._max_size = max_size
        self._max_waiting = max_waiting
        self._max_wait = max_wait
        # (item, its future result, the loop time by which it must be in a batch)
        self._waiting: list[tuple[Item, asyncio.Future[Result], float]] = []
        self._running: set[asyncio.Future[Result]] = set()  # the batch being run
        self._runner: asyncio.Task[None] | None = None

    def submit(self, item: Item) -> asyncio.Future[Result] | None:
        """The future result of `item`, or None when too many calls wait already."""
        if len(self._waiting) >= self._max_waiting:
            return None
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future, self._expiry()))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run_batches())
            self._runner.add_done_callback(self._runner_done)
        return future

    async def run(self, item: Item) -> Result | None:
        """The result of `item`, run in a batch; None when too many calls wait already (the
        caller then goes alone). PoolTimeout when no batch took it in time."""
        future = self.submit(item)
        if future is None:
            return None
        timeout = self._expiry() - asyncio.get_running_loop().time()
        try:
            await asyncio.wait({future}, timeout=None if timeout == float("inf") else timeout)
            if not future.done() and future in self._running:
                # Taken in time: its batch waits for a connection no longer than this call
                # may (_run_batches), and its statements have their own time-out.
                return await future
        finally:
            if not future.done():  # timed out, or this call was cancelled
                future.cancel()  # the runner skips it, or drops its result
        if future.cancelled():
            raise not_taken()
        return future.result()

    def _expiry(self) -> float:
        """The loop time by which a call submitted now must be in a batch."""
        deadline = db.call_deadline.get()
        expires = asyncio.get_running_loop().time() + self._max_wait
        return expires if deadline is None else min(expires, deadline)

    def _runner_done(self, runner: asyncio.Task[None]) -> None:
        """A runner ends when nothing waits, unless it was cancelled (the loop is closing) or
        failed (a bug): then nobody may be left waiting forever."""
        error = None if runner.cancelled() else runner.exception()
        if error is not None:
            log.error("the batch runner failed", exc_info=error)
        if runner.cancelled() or error is not None:
            for _, future, _ in self._waiting:
                if error is None:
                    future.cancel()
                elif not future.done():
                    future.set_exception(error)
            self._waiting = []

    def _next_batch(self) -> list[tuple[Item, asyncio.Future[Result], float]]:
        """The waiting calls with no key in common, oldest first; the rest wait on."""
        batch, later, taken = [], [], set()
        now = asyncio.get_running_loop().time()
        for entry in self._waiting:
            if entry[1].done():  # cancelled while waiting
                continue
            if entry[2] <= now:  # its caller's wait is over (its timer may not have fired)
                entry[1].set_exception(not_taken())
                continue
            keys = self._keys(entry[0])
            if len(batch) < self._max_size and taken.isdisjoint(keys):
                batch.append(entry)
                taken.update(keys)
            else:
                later.append(entry)
        self._waiting = later
        return batch

    async def _run_batches(self) -> None:
        while batch := self._next_batch():
            self._running = {future for _, future, _ in batch}
            # The latest: one member with a short deadline must not fail the others. A
            # caller whose deadline comes first is cancelled by gRPC, and its result dropped.
            expires = max(expires for _, _, expires in batch)
            db.call_deadline.set(None if expires == float("inf") else expires)
            try:
                results = await self._run([item for item, _, _ in batch])
            except Exception as error:
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            except BaseException:
                for _, future, _ in batch:  # cancelled; the waiting ones: see _runner_done
                    future.cancel()
                raise
            finally:
                self._running = set()
            if len(results) != len(batch):  # a bug; fail the batch rather than strand one
                error = RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
                results = [error] * len(batch)
            for (_, future, _), result in zip(batch, results, strict=True):
                if future.done():  # the call was cancelled meanwhile
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def not_taken() -> PoolTimeout:
    return PoolTimeout("no batch could take the posting before its deadline")
