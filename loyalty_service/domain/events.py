"""Events: what the event log records of each change, for subscribers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from .accounts import Account
from .errors import EventPositionAhead, EventPositionExpired
from .holds import Hold
from .ids import new_id
from .points import PointsTransaction


class EventType(enum.StrEnum):
    ACCOUNT_CREATED = "loyalty.account.created"
    ACCOUNT_UPDATED = "loyalty.account.updated"
    ACCOUNT_CLOSED = "loyalty.account.closed"
    ACCOUNT_REOPENED = "loyalty.account.reopened"
    ACCOUNT_MERGED = "loyalty.account.merged"
    ACCOUNT_TIER_CHANGED = "loyalty.account.tier_changed"
    TRANSACTION_CREATED = "points_transaction.created"
    HOLD_CREATED = "points_hold.created"
    HOLD_CAPTURED = "points_hold.captured"
    HOLD_RELEASED = "points_hold.released"
    HOLD_EXPIRED = "points_hold.expired"


ACCOUNT_EVENT_TYPES = frozenset(t for t in EventType if t.startswith("loyalty.account."))


TRANSACTION_EVENT_TYPES = frozenset({EventType.TRANSACTION_CREATED})


HOLD_EVENT_TYPES = frozenset(t for t in EventType if t.startswith("points_hold."))


@dataclass(frozen=True)
class Event:
    id: str  # `evt_` + random: the same on every delivery, for consumers to de-duplicate
    type: EventType
    create_time: datetime
    program: str
    account: str
    # The resource as of the change: an Account (account events), a PointsTransaction or a
    # Hold.
    snapshot: Account | PointsTransaction | Hold
    # 1, 2, 3, ... in commit order; 0 until the event is written.
    position: int = 0


def account_event(type_: EventType, account: Account) -> Event:
    return Event(
        id=new_id("evt_"),
        type=type_,
        create_time=account.update_time,
        program=account.program,
        account=account.id,
        snapshot=account,
    )


def transaction_event(transaction: PointsTransaction, program: str) -> Event:
    return Event(
        id=new_id("evt_"),
        type=EventType.TRANSACTION_CREATED,
        create_time=transaction.create_time,
        program=program,
        account=transaction.account,
        snapshot=transaction,
    )


@dataclass(frozen=True)
class EventFilter:
    """Which events a subscriber or a list wants; None and empty mean any."""

    types: frozenset[EventType]
    program: str | None = None
    account: str | None = None

    def matches(self, event: Event) -> bool:
        return (
            event.type in self.types
            and (self.program is None or event.program == self.program)
            and (self.account is None or event.account == self.account)
        )


def position_expired(after: int, oldest: int) -> EventPositionExpired:
    return EventPositionExpired(
        f"events after position {after} are no longer retained; the oldest retained is {oldest}",
        position=after,
        oldestPosition=oldest,
    )


def check_position(after: int, oldest: int, newest: int) -> None:
    """A stream or list may start after any position from just before the oldest retained
    event up to the newest: anything else would skip events silently."""
    if after < oldest - 1:
        raise position_expired(after, oldest)
    if after > newest:
        raise EventPositionAhead(
            f"position {after} is past the newest event, {newest}",
            position=after,
            newestPosition=newest,
        )
