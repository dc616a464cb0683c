"""Use-case tests of holds on PostgreSQL, with an injected clock: expiry at the instant, the
debit that settles expired holds only when it needs them, the expiry job's passes (killed
midway, two at once), and a model of holds and debits that hypothesis drives."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loyalty_service import db, domain, store
from loyalty_service.domain.callers import ANYONE
from loyalty_service.domain.errors import HoldNotActive, InsufficientPoints
from loyalty_service.domain.holds import Hold, HoldStatus, NewHold
from loyalty_service.domain.points import Direction, NewTransaction, TransactionType
from loyalty_service.ledger import Ledger
from loyalty_service.ledger.checks import find_violations
from loyalty_service.ledger.holds import expire_due_holds
from tests.ledger.support import autocommit_connection, sequence

START = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now


def with_clock(url: str, scenario: Callable[[Ledger, Clock], Awaitable[None]]) -> None:
    """Runs `scenario` on a ledger whose clock it moves, then checks the invariants (no
    grace for unrecorded expiries: the scenario runs the job itself)."""

    async def main() -> None:
        clock = Clock()
        async with db.create_pool(url, size=4) as pool:
            await scenario(Ledger(pool, clock=clock), clock)
            await expire_pass(pool, datetime.now(UTC) + timedelta(days=400))
            assert await find_violations(pool, expiry_grace=timedelta(0)) == []

    asyncio.run(main())


async def expire_pass(pool, now: datetime) -> int:
    async with db.connection(pool) as conn:
        return await expire_due_holds(conn, now, 1_000)


async def funded(ledger: Ledger, balance: int) -> str:
    account = await ledger.create_account(ANYONE, "prog_default", None, {})
    if balance:
        earn = NewTransaction(account.id, TransactionType.EARN, Direction.CREDIT, balance)
        await ledger.create_transaction(ANYONE, earn)
    return account.id


def new_hold(account: str, amount: int, reference: str, ttl: int | None = None) -> NewHold:
    return NewHold(account, amount, reference, "", {}, ttl)


def redeem(account: str, amount: int) -> NewTransaction:
    return NewTransaction(account, TransactionType.REDEEM, Direction.DEBIT, amount)


async def expired_events(ledger: Ledger, hold_id: str) -> int:
    await sequence(ledger)
    async with db.connection(ledger.pool) as conn:
        cursor = await conn.execute(
            "SELECT count(*) AS n FROM events"
            " WHERE type = 'points_hold.expired' AND snapshot ->> 'id' = %s",
            [hold_id],
        )
        row = await cursor.fetchone()
        assert row is not None
        return row.n


def test_a_hold_expires_at_its_instant(databases):
    async def scenario(ledger: Ledger, clock: Clock) -> None:
        account = await funded(ledger, 100)
        early = await ledger.create_hold(ANYONE, new_hold(account, 40, "early", ttl=60))
        late = await ledger.create_hold(ANYONE, new_hold(account, 40, "late", ttl=60))
        assert early.expire_time == START + timedelta(seconds=60)
        # A microsecond before: still HELD, and captured.
        clock.now = early.expire_time - timedelta(microseconds=1)
        assert (await ledger.get_hold(ANYONE, early.id)).status is HoldStatus.HELD
        captured = await ledger.capture_hold(ANYONE, early.id, None)
        assert captured.status is HoldStatus.CAPTURED
        # At the instant: EXPIRED, not captured, and its points are free.
        clock.now = late.expire_time
        assert (await ledger.get_hold(ANYONE, late.id)).status is HoldStatus.EXPIRED
        with pytest.raises(HoldNotActive) as refused:
            await ledger.capture_hold(ANYONE, late.id, None)
        assert refused.value.metadata == {"hold": late.id, "status": "EXPIRED"}
        with pytest.raises(HoldNotActive):
            await ledger.release_hold(ANYONE, late.id)
        after = await ledger.get_account(ANYONE, account)
        assert (after.balance, after.held_points, after.available_balance) == (60, 0, 60)

    with_clock(databases.create(), scenario)


def test_a_debit_settles_expired_holds_only_when_it_needs_them(databases):
    async def scenario(ledger: Ledger, clock: Clock) -> None:
        account = await funded(ledger, 100)
        held = await ledger.create_hold(ANYONE, new_hold(account, 80, "a", ttl=60))
        clock.now = held.expire_time
        # 20 points are free without the expired hold: nothing settled.
        await ledger.create_transaction(ANYONE, redeem(account, 10))
        assert await expired_events(ledger, held.id) == 0
        # 50 need the expired hold's points: its expiry is recorded first, in the debit's
        # transaction, with its event.
        await ledger.create_transaction(ANYONE, redeem(account, 50))
        assert await expired_events(ledger, held.id) == 1
        after = await ledger.get_account(ANYONE, account)
        assert (after.balance, after.held_points) == (40, 0)
        # A hold that needs them settles them too; a refused debit still records them.
        second = await ledger.create_hold(ANYONE, new_hold(account, 30, "b", ttl=10))
        clock.now += timedelta(seconds=10)
        with pytest.raises(InsufficientPoints) as refused:
            await ledger.create_transaction(ANYONE, redeem(account, 41))
        assert refused.value.metadata == {
            "available": "40", "held": "0", "balance": "40", "requested": "41",
        }  # fmt: skip
        assert await expired_events(ledger, second.id) == 1
        third = await ledger.create_hold(ANYONE, new_hold(account, 40, "c"))
        assert third.status is HoldStatus.HELD

    with_clock(databases.create(), scenario)


def test_expiry_passes_killed_midway_or_two_at_once_record_each_once(databases):
    url = databases.create()

    async def scenario(ledger: Ledger, clock: Clock) -> None:
        accounts = [await funded(ledger, 100) for _ in range(12)]
        # Each account's three holds expire a second after the previous account's.
        holds = [
            await ledger.create_hold(ANYONE, new_hold(a, 10, f"{a}-{i}", ttl=5 + n))
            for n, a in enumerate(accounts)
            for i in range(3)
        ]
        later = START + timedelta(seconds=5 + 11)
        # A pass that stops after two accounts (as one killed would): the rest remain.
        async with db.connection(ledger.pool) as conn:
            assert await expire_due_holds(conn, later, 6) == 6
        # Two passes at once, each on a connection of its own, as two replicas would.
        first, second = [await autocommit_connection(url) for _ in range(2)]
        async with first, second:
            done = await asyncio.gather(
                expire_due_holds(first, later, 1_000), expire_due_holds(second, later, 1_000)
            )
        assert sum(done) == 36 - 6
        for h in holds:
            assert await expired_events(ledger, h.id) == 1
        for a in accounts:
            account = await ledger.get_account(ANYONE, a)
            assert (account.held_points, account.version) == (0, 2 + 3 + 1)
        async with db.connection(ledger.pool) as conn:
            assert await expire_due_holds(conn, later, 1_000) == 0

    with_clock(url, scenario)


def test_a_merge_moves_holds_whose_time_is_up_too(databases):
    async def scenario(ledger: Ledger, clock: Clock) -> None:
        source, target = await funded(ledger, 100), await funded(ledger, 100)
        short = await ledger.create_hold(ANYONE, new_hold(source, 30, "short", ttl=5))
        long = await ledger.create_hold(ANYONE, new_hold(source, 20, "long", ttl=500))
        clock.now += timedelta(seconds=5)
        merged = await ledger.merge_accounts(ANYONE, source, target)
        assert (merged.target.balance, merged.target.held_points) == (200, 20)
        moved = await ledger.get_hold(ANYONE, short.id)
        assert (moved.account, moved.original_account, moved.status) == (
            target, source, HoldStatus.EXPIRED,
        )  # fmt: skip
        assert await expire_pass(ledger.pool, clock.now) == 1
        assert await expired_events(ledger, short.id) == 1
        assert (await ledger.capture_hold(ANYONE, long.id, 5)).account == target

    with_clock(databases.create(), scenario)


# --- a model: holds, captures, releases, debits and time, against a few lines of Python ---

_steps = st.lists(
    st.one_of(
        st.tuples(st.just("hold"), st.integers(1, 60), st.integers(1, 30)),
        st.tuples(st.just("redeem"), st.integers(1, 60)),
        st.tuples(st.just("capture"), st.integers(0, 9), st.integers(1, 60)),
        st.tuples(st.just("release"), st.integers(0, 9)),
        st.tuples(st.just("wait"), st.integers(1, 20)),
        st.tuples(st.just("expire")),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=_steps, start=st.integers(0, 200))
def test_holds_and_debits_follow_the_model(databases_for_hypothesis, steps, start):
    """Available points are the balance less what unexpired HELD holds hold; every debit and
    hold fits in them; a capture spends at most its hold and frees all of it."""
    url = databases_for_hypothesis

    async def scenario(ledger: Ledger, clock: Clock) -> None:
        account = await funded(ledger, start)
        balance, holds = start, []  # holds: [id, amount, expire_time, open]

        def held() -> int:
            return sum(h[1] for h in holds if h[3] and clock.now < h[2])

        for step in steps:
            if step[0] == "hold":
                _, amount, ttl = step
                ok = balance - held() >= amount
                try:
                    made = await ledger.create_hold(
                        ANYONE, new_hold(account, amount, secrets.token_hex(8), ttl)
                    )
                    holds.append([made.id, amount, clock.now + timedelta(seconds=ttl), True])
                    assert ok
                except InsufficientPoints:
                    assert not ok
            elif step[0] == "redeem":
                ok = balance - held() >= step[1]
                try:
                    await ledger.create_transaction(ANYONE, redeem(account, step[1]))
                    balance -= step[1]
                    assert ok
                except InsufficientPoints:
                    assert not ok
            elif step[0] in ("capture", "release") and holds:
                target = holds[step[1] % len(holds)]
                active = target[3] and clock.now < target[2]
                try:
                    if step[0] == "capture":
                        points = min(step[2], target[1])
                        await ledger.capture_hold(ANYONE, target[0], points)
                        balance -= points
                    else:
                        await ledger.release_hold(ANYONE, target[0])
                    assert active
                    target[3] = False
                except HoldNotActive:
                    assert not active
            elif step[0] == "wait":
                clock.now += timedelta(seconds=step[1])
            elif step[0] == "expire":
                await expire_pass(ledger.pool, clock.now)
            account_now = await ledger.get_account(ANYONE, account)
            assert (account_now.balance, account_now.held_points) == (balance, held())

    with_clock(url, scenario)


@pytest.fixture(scope="module")
def databases_for_hypothesis(databases) -> str:
    """One database for all of hypothesis's examples (each uses accounts of its own)."""
    return databases.create()


def test_holds_are_read_as_the_codec_reads_them(databases):
    """store.holds.hold_of (explicit, for speed) reads hold_json's object as the codec would."""

    async def scenario(ledger: Ledger, clock: Clock) -> None:
        account = await funded(ledger, 100)
        held = await ledger.create_hold(ANYONE, new_hold(account, 10, "a"))
        captured = await ledger.capture_hold(ANYONE, held.id, 4)
        released = await ledger.release_hold(
            ANYONE, (await ledger.create_hold(ANYONE, new_hold(account, 5, "b"))).id
        )
        async with db.connection(ledger.pool) as conn:
            cursor = await conn.execute(
                "SELECT hold_json(points_holds, now()) AS hold FROM points_holds"
                " WHERE id = ANY(%s)",
                [[held.id, released.id]],
            )
            rows = await cursor.fetchall()
        assert len(rows) == 2
        for row in rows:
            assert store.holds.hold_of(row.hold) == domain.codec.from_json(Hold, row.hold)
        assert captured.capture_transaction is not None

    with_clock(databases.create(), scenario)
