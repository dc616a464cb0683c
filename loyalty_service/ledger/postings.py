"""Posting what a use case worked out, through the kernel (store.postings.post)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import replace

from .. import domain, store
from ..domain.accounts import Account
from ..domain.events import Event
from ..domain.points import PointsTransaction
from ..store.sql import Conn

# The events a use case's postings leave to log, for the transaction UseCases.run holds (set
# by run, one list per attempt). Logged with the COMMIT, after everything else the use case
# writes: the event log's head, which serialises every writer's commit, is then held for
# the commit's round trip only, not across the use case's next round trips.
transaction_events: ContextVar[list[object]] = ContextVar("transaction_events")


def log_with_commit(events: list[Event]) -> None:
    """Queues a use case's events for UseCases.run to log with the COMMIT (see
    transaction_events)."""
    transaction_events.get().extend(store.events.event_rows(events))


async def post(
    conn: Conn,
    postings: list[tuple[PointsTransaction, domain.points.Change]],
    events_before: list[Event] | None = None,
) -> tuple[list[PointsTransaction], Account | None]:
    """Posts through the kernel, in order, what a use case worked out under its account's
    lock. Their events, after `events_before`, are logged by UseCases.run with the COMMIT,
    after whatever the use case writes next (see transaction_events). The posted
    transactions and the account after them (None if there were none); the first refused
    raises why, failing the use case and so undoing the others."""
    if not postings:
        log_with_commit(events_before or [])
        return [], None
    new = [store.postings.NewPosting(ptx, change) for ptx, change in postings]
    try:
        done = await store.postings.post(
            conn,
            new,
            snapshots=True,
            events_before=events_before,
            unlogged=transaction_events.get(),
        )
    except store.postings.NotTaken as error:
        raise error.error from None  # a use case posts without request keys: not a race of ours
    posted = []
    for (ptx, change), result in zip(postings, done, strict=True):
        if result.result != store.postings.POSTED:
            raise domain.points.refusal(result.result, ptx.account, result.account, change)
        posted.append(replace(ptx, points_after=result.points_after))
    return posted, done[-1].account


def posting_keys(posting: store.postings.NewPosting) -> tuple[object, ...]:
    """What may appear only once in a batch of postings: the request key. Postings on one
    account may share a batch: the kernel applies them in order, each within its bounds as
    the ones before it left the account (so a hot account takes a batch per commit too)."""
    return () if posting.request is None else (posting.request[0],)
