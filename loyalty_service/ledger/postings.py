"""Posting what a use case worked out, through the kernel (store.postings.post)."""

from __future__ import annotations

from dataclasses import replace

from .. import domain, store
from ..domain.accounts import Account
from ..domain.callers import Caller
from ..domain.events import Event
from ..domain.points import PointsTransaction
from ..store.sql import Conn


async def post(
    conn: Conn,
    caller: Caller,
    postings: list[tuple[PointsTransaction, domain.points.Change]],
    events_before: list[Event] | None = None,
) -> tuple[list[PointsTransaction], Account | None]:
    """Posts through the kernel, in order, what a use case worked out under its account's
    lock, the last lock it takes; the kernel queues their events, after `events_before`.
    The posted transactions and the account after them (None if there were none); the first
    refused raises why, failing the use case and so undoing the others. Each records
    `caller` as its actor."""
    postings = [(replace(ptx, actor=caller.identity), change) for ptx, change in postings]
    if not postings:
        await store.events.log_events(conn, events_before or [])
        return [], None
    new = [store.postings.NewPosting(ptx, change) for ptx, change in postings]
    try:
        done = await store.postings.post(conn, new, snapshots=True, events_before=events_before)
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
