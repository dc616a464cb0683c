"""Use cases of holds: create, capture, release, read; and the job that records expiries
(HoldExpiry).

Each write is one statement of a store function (store.holds), so one transaction and one
round trip: it locks the account, then the hold (the order everywhere), decides and
writes. A capture posts its REDEEM through the kernel inside that statement.
"""

from __future__ import annotations

import logging
from datetime import datetime

from .. import db, domain, store
from ..domain.callers import LIMITED_CALLER, Caller
from ..domain.errors import FieldViolation, HoldReferenceReused
from ..domain.holds import Hold, HoldFilter, NewHold
from ..domain.ids import Page, new_id
from ..store.holds import CAPTURED, CREATED, EXISTING, MOVED, RELEASED, REPLAYED
from ..store.postings import NewPosting
from ..store.sql import Conn
from .jobs import SingletonJob
from .requests import Clock, UseCases, raise_if_any, request_id_reused, request_key, system_clock

log = logging.getLogger(__name__)

# Tries of a capture or release whose hold a merge keeps moving (each merge moves it once).
_TRIES = 3


class HoldUseCases(UseCases):
    async def create_hold(self, caller: Caller, new: NewHold) -> Hold:
        """A hold of `new.amount` points on its account, once per reference in the program:
        the same reference again gets the first hold (as it is now), if it asked for the
        same; otherwise HOLD_REFERENCE_REUSED."""
        # What the request asked for, in a fixed order, for its fingerprint.
        asked = [new.account, new.amount, new.reason, new.metadata, new.ttl_seconds]
        fingerprint = domain.codec.digest(asked)
        hold_id, event_id = new_id("hold_"), new_id("evt_")
        for _ in range(_TRIES):
            async with db.connection(self.pool) as conn:
                try:
                    written = await store.holds.create_hold(
                        conn, hold_id, new, caller.programs, self.clock(), caller.identity,
                        fingerprint, event_id,
                    )  # fmt: skip
                except store.holds.ReferenceTaken:
                    continue  # the racing first request committed it: found next time
            if written.result == CREATED:
                assert written.hold is not None
                return written.hold
            if written.result == EXISTING:
                assert written.hold is not None
                if written.fingerprint != fingerprint:
                    raise HoldReferenceReused(
                        f"reference {new.reference} was used for a different hold",
                        reference=new.reference,
                        hold=written.hold.id,
                    )
                return written.hold
            raise domain.holds.creation_refusal(
                written.result, new, written.account, written.max_ttl_seconds
            )
        raise RuntimeError("CreateHold: the reference kept being taken")

    async def capture_hold(
        self, caller: Caller, hold_id: str, amount: int | None, request_id: str = ""
    ) -> Hold:
        """Captures `amount` (None: all) of the hold: one REDEEM of it, the rest released."""
        capture = NewPosting(*domain.holds.capture_posting(hold_id, self.clock(), caller.identity))
        params = {"id": hold_id, "amount": amount}
        method = "CaptureHold"
        return await self._finish(caller, method, hold_id, capture, amount, request_id, params)

    async def release_hold(self, caller: Caller, hold_id: str, request_id: str = "") -> Hold:
        """Releases the hold: its points are available again. In any account status."""
        params = {"id": hold_id}
        return await self._finish(caller, "ReleaseHold", hold_id, None, None, request_id, params)

    async def _finish(
        self,
        caller: Caller,
        method: str,
        hold_id: str,
        capture: NewPosting | None,
        amount: int | None,
        request_id: str,
        params: dict[str, object],
    ) -> Hold:
        request = request_key(caller, method, request_id, params) if request_id else None
        for _ in range(_TRIES):
            async with db.connection(self.pool) as conn:
                written = await store.holds.finish_hold(
                    conn,
                    hold_id,
                    capture=capture,
                    amount=amount,
                    programs=caller.programs,
                    now=self.clock(),
                    actor=caller.identity,
                    request=request,
                    event_id=new_id("evt_"),
                )
            if written.result == MOVED:
                continue  # a merge moved the hold to another account: lock that one
            if written.result in (CAPTURED, RELEASED):
                assert written.hold is not None
                return written.hold
            if written.result == REPLAYED:
                assert written.hold is not None and request is not None
                if written.fingerprint != request[1]:
                    raise request_id_reused(request_id)
                return written.hold
            raise domain.holds.finish_refusal(
                written.result, hold_id, written.hold, written.account, amount
            )
        raise RuntimeError(f"{method}: the hold kept moving under concurrent merges")

    async def get_hold(self, caller: Caller, hold_id: str) -> Hold:
        hold = await self.call(store.holds.get_hold, hold_id, self.clock())
        if hold is None or not caller.sees(hold.program):
            raise domain.holds.hold_not_found(hold_id)
        return hold

    async def list_holds(
        self, caller: Caller, where: HoldFilter, after: int | None, limit: int
    ) -> Page[Hold]:
        if caller.programs is not None:
            if where.account is None:
                raise_if_any([FieldViolation("account", LIMITED_CALLER)])
            else:
                await self.require_account(caller, where.account)
        return await self.call(store.holds.list_holds, where, after, limit, self.clock())

    async def expire_holds(self, limit: int = 100) -> int:
        """One pass of the hold expiry job (HoldExpiry), on a connection of the pool."""
        async with db.connection(self.pool) as conn:
            return await expire_due_holds(conn, self.clock(), limit)


# The actor of an expiry the job records: the service itself.
EXPIRY_ACTOR = "loyalty-service"


async def expire_due_holds(conn: Conn, now: datetime, limit: int) -> int:
    """Records the expiry of the HELD holds whose time is up at `now`, on the accounts of up
    to `limit` of them, each account in a transaction of its own (autocommit): a pass killed
    midway leaves the rest for the next, and a second pass at once records nothing twice
    (settle_expired_holds finds HELD holds only, under the account's lock). How many
    expired."""
    expired = 0
    for account_id in await store.holds.accounts_with_expired_holds(conn, now, limit):
        expired += await store.holds.settle_expired_holds(conn, account_id, now, EXPIRY_ACTOR)
    return expired


# Seconds between passes of the hold expiry job: about the most an expired hold waits to be
# recorded (reads and debits treat it as expired from its expire_time on, recorded or not).
EXPIRY_INTERVAL = 1.0
# Holds looked at per pass, at most: a pass is short, whatever the backlog.
EXPIRY_BATCH = 100
# Seconds an expired hold may wait to be recorded before replicas warn about it.
EXPIRY_LAGGING = 60.0


class HoldExpiry(SingletonJob):
    """Records expiries, one replica at a time: each hold's status, its event, the account's
    held points and version."""

    name = "hold expiry"

    def __init__(self, database_url: str, clock: Clock = system_clock) -> None:
        super().__init__(database_url, db.HOLD_EXPIRY_LOCK_ID, EXPIRY_INTERVAL)
        self.clock = clock

    async def one_pass(self, conn: Conn) -> bool:
        return await expire_due_holds(conn, self.clock(), EXPIRY_BATCH) > 0

    async def standby(self, conn: Conn) -> None:
        """A replica that does not run the job says so when nobody seems to."""
        now = self.clock()
        oldest = await store.holds.oldest_unsettled_expiry(conn, now)
        if oldest is not None and (now - oldest).total_seconds() > EXPIRY_LAGGING:
            waited = (now - oldest).total_seconds()
            log.warning("a hold that expired %.1f s ago is not yet recorded as EXPIRED", waited)
