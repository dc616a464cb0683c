"""The posting kernel (store.postings.post, SQL function post_points) on a real PostgreSQL,
without gRPC: the tier rule it shares with domain.programs.tier_for, the reasons it refuses,
postings in order on one account, reversals, and the events it logs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from loyalty_service import db, domain, store
from loyalty_service.db import libpq_url
from loyalty_service.domain.accounts import AccountStatus
from loyalty_service.domain.callers import ANYONE
from loyalty_service.domain.errors import (
    AccountNotActive,
    AccountNotFound,
    BalanceLimitExceeded,
    InsufficientPoints,
    RequestIdReused,
)
from loyalty_service.domain.events import EventFilter, EventType, account_event
from loyalty_service.domain.ids import MAX_BALANCE
from loyalty_service.domain.points import (
    Direction,
    NewTransaction,
    OriginKind,
    TransactionType,
    change,
    refusal,
    reversal,
    to_post,
)
from loyalty_service.domain.programs import NewProgram, Tier
from loyalty_service.ledger import Ledger
from tests.domain.test_tiers import TIER_CASES
from tests.ledger.support import autocommit_connection, run, sequence

EARN, REDEEM = TransactionType.EARN, TransactionType.REDEEM
CREDIT, DEBIT = Direction.CREDIT, Direction.DEBIT
SILVER = Tier("silver", 100)


@pytest.fixture(scope="module")
def sql(databases):
    with psycopg.connect(libpq_url(databases.create())) as conn:
        yield conn


# The tier rule's one table of cases (tests/domain/test_tiers.py), against its SQL home.
@pytest.mark.parametrize(("before", "after", "tiers", "held", "expected"), TIER_CASES)
def test_tier_after_in_sql_follows_the_tier_rules_table(sql, before, after, tiers, held, expected):
    as_json = json.dumps([{"name": t.name, "lifetime_points": t.lifetime_points} for t in tiers])
    (got,) = sql.execute(
        "SELECT tier_after(%s::jsonb, %s, %s, %s)", [as_json, held, before, after]
    ).fetchone()
    assert got == expected


# -- the kernel -----------------------------------------------------------------------------


def posting(account: str, type_: TransactionType, direction: Direction, amount: int):
    new = NewTransaction(account, type_, direction, amount)
    return store.postings.NewPosting(
        to_post(new, datetime.now(UTC)), change(type_, direction, amount)
    )


def test_postings_on_one_account_apply_in_order_and_refusals_say_why(databases):
    """Several postings on one account in one call see each other's changes; a refused one
    changes nothing and says why, with the account as the kernel found it."""
    url = databases.create()

    async def scenario(ledger: Ledger) -> None:
        program = await ledger.create_program(
            ANYONE, None, NewProgram("Tiered", "EUR", tiers=[SILVER])
        )
        account = (await ledger.create_account(ANYONE, program.id, None, {})).id
        async with db.connection(ledger.pool) as conn:
            done = await store.postings.post(
                conn,
                [
                    posting(account, EARN, CREDIT, 60),
                    posting(account, REDEEM, DEBIT, 70),  # 60 only: refused
                    posting(account, EARN, CREDIT, 50),  # 110: silver
                    posting(account, REDEEM, DEBIT, 110),
                    posting(account, EARN, CREDIT, MAX_BALANCE + 1),  # over the limit
                    posting("loy_" + "N" * 20, EARN, CREDIT, 1),
                ],
                snapshots=True,
            )
        assert [d.result for d in done] == [
            "POSTED", "INSUFFICIENT_POINTS", "POSTED", "POSTED", "BALANCE_LIMIT_EXCEEDED",
            "ACCOUNT_NOT_FOUND",
        ]  # fmt: skip
        assert [d.points_after for d in done] == [60, None, 110, 0, None, None]
        refused = done[1].account
        assert refused is not None and (refused.balance, refused.lifetime_points) == (60, 60)
        assert done[3].account is None, "a snapshot only of the last posting"
        after = await ledger.get_account(ANYONE, account)
        assert (after.balance, after.lifetime_points, after.tier, after.version) == (
            0, 110, "silver", 4
        )  # fmt: skip
        # The reasons become the domain's errors, with the values the kernel saw.
        error = refusal(done[1].result, account, refused, change(REDEEM, DEBIT, 70))
        assert isinstance(error, InsufficientPoints)
        assert error.metadata == {
            "available": "60",
            "held": "0",
            "balance": "60",
            "requested": "70",
        }
        limit = refusal(done[4].result, account, done[4].account, change(EARN, CREDIT, 10))
        assert isinstance(limit, BalanceLimitExceeded)
        missing = refusal(done[5].result, "loy_" + "N" * 20, None, change(EARN, CREDIT, 1))
        assert isinstance(missing, AccountNotFound)
        # Each posted one logged its event, the promotion's right after the posting's.
        await sequence(ledger)
        page = await ledger.list_events(
            ANYONE, EventFilter(frozenset(EventType)), 0, 100, check=False
        )
        logged = [(e.type, e.position) for e in page.events if e.account == account]
        assert logged == [
            (EventType.ACCOUNT_CREATED, 1), (EventType.TRANSACTION_CREATED, 2),
            (EventType.TRANSACTION_CREATED, 3), (EventType.ACCOUNT_TIER_CHANGED, 4),
            (EventType.TRANSACTION_CREATED, 5),
        ]  # fmt: skip

    run(url, scenario)


def test_a_refunds_reversal_takes_a_closed_account_and_counts_itself(databases):
    """A reversal is counted on the transaction it reverses; only a refund's is taken by a
    CLOSED account, and a reversal may overdraw."""
    url = databases.create()

    async def scenario(ledger: Ledger) -> None:
        account = (await ledger.create_account(ANYONE, "prog_default", None, {})).id
        earned = await ledger.create_transaction(ANYONE, NewTransaction(account, EARN, CREDIT, 50))
        await ledger.create_transaction(ANYONE, NewTransaction(account, REDEEM, DEBIT, 40))
        await ledger.close_account(ANYONE, account)
        now = datetime.now(UTC)
        origin = (OriginKind.REFUND, "ref_1")
        by_hand = reversal(earned, 30, origin, "by hand", now, refund=False)
        by_refund = reversal(earned, 30, origin, "refund", now, refund=True)
        async with db.connection(ledger.pool) as conn:
            new = [store.postings.NewPosting(*p) for p in (by_hand, by_refund)]
            done = await store.postings.post(conn, new)
            assert [d.result for d in done] == ["ACCOUNT_NOT_ACTIVE", "POSTED"]
            assert done[0].account is not None
            assert done[0].account.status is AccountStatus.CLOSED
            assert isinstance(
                refusal(done[0].result, account, done[0].account, by_hand[1]), AccountNotActive
            )
            assert done[1].points_after == -20  # 10 left, 30 taken back
        reversed_ = await ledger.get_transaction(ANYONE, earned.id)
        assert reversed_.reversed_amount == 30
        account_after = await ledger.get_account(ANYONE, account)
        assert (account_after.balance, account_after.lifetime_points) == (-20, 50)

    run(url, scenario)


async def logged(ledger: Ledger) -> list[tuple[EventType, int]]:
    """Every event in the log: its type and position."""
    await sequence(ledger)
    page = await ledger.list_events(ANYONE, EventFilter(frozenset(EventType)), 0, 100, check=False)
    return [(e.type, e.position) for e in page.events]


def test_events_before_come_first_and_a_refusal_undoes_nothing_else(databases):
    """The events a use case gives the kernel are logged before the postings' own, in the
    same append; a call whose postings are all refused logs only those events."""
    url = databases.create()

    async def scenario(ledger: Ledger) -> None:
        account = await ledger.create_account(ANYONE, "prog_default", None, {})
        updated = account_event(EventType.ACCOUNT_UPDATED, account)
        async with db.connection(ledger.pool) as conn:
            done = await store.postings.post(
                conn,
                [posting(account.id, EARN, CREDIT, 5)],
                snapshots=True,
                events_before=[updated],
            )
            assert done[0].points_after == 5
            now = datetime.now(UTC)
            assert done[0].account == await store.accounts.get_account(conn, account.id, now)
            again = account_event(EventType.ACCOUNT_UPDATED, account)
            refused = await store.postings.post(
                conn, [posting(account.id, REDEEM, DEBIT, 6)], events_before=[again]
            )
            assert refused[0].result == "INSUFFICIENT_POINTS"
        assert await logged(ledger) == [
            (EventType.ACCOUNT_CREATED, 1),
            (EventType.ACCOUNT_UPDATED, 2),
            (EventType.TRANSACTION_CREATED, 3),
            (EventType.ACCOUNT_UPDATED, 4),
        ]

    run(url, scenario)


def test_writers_never_hold_the_head_and_a_pass_moves_only_what_committed(databases):
    """Writers queue their events (log_events: in the kernel, or by a use case that posts
    nothing) and lock nothing that other writers or the sequencer need: a pass while a
    writer's transaction is open neither waits for it nor moves its events, and the next
    pass after its commit moves them, in order."""
    url = databases.create()

    async def head_locked(other: psycopg.AsyncConnection) -> bool:
        try:
            await other.execute("SELECT position FROM event_log_head FOR UPDATE NOWAIT")
        except psycopg.errors.LockNotAvailable:
            return True
        return False

    async def scenario(ledger: Ledger) -> None:
        account = await ledger.create_account(ANYONE, "prog_default", None, {})
        updated = account_event(EventType.ACCOUNT_UPDATED, account)
        async with (
            db.connection(ledger.pool) as conn,
            await autocommit_connection(url) as sequencer,
        ):
            async with conn.transaction():
                await store.events.log_events(conn, [updated])
                done = await store.postings.post(conn, [posting(account.id, EARN, CREDIT, 5)])
                assert [d.result for d in done] == ["POSTED"]
                await store.postings.post(conn, [posting(account.id, EARN, CREDIT, 1)])
                assert not await head_locked(sequencer)
                # The account's creation, committed before: not this transaction's three.
                assert await store.events.sequence_events(sequencer, 100) == 1
            assert await store.events.sequence_events(sequencer, 100) == 3
            assert await store.events.sequence_events(sequencer, 100) == 0
        assert await logged(ledger) == [
            (EventType.ACCOUNT_CREATED, 1),
            (EventType.ACCOUNT_UPDATED, 2),
            (EventType.TRANSACTION_CREATED, 3),
            (EventType.TRANSACTION_CREATED, 4),
        ]

    run(url, scenario)


def test_the_kernel_promotes_and_logs_in_order(databases):
    """store.postings.post, a posting alone (with and without a request id) and a batch,
    several on one account among them: each promotion's event comes right after its transaction's,
    the positions run on with no gap, and the snapshot reads back as the account."""
    url = databases.create()

    def posting(account: str, amount: int, key: str | None = None) -> store.postings.NewPosting:
        new = NewTransaction(account, TransactionType.EARN, Direction.CREDIT, amount)
        change = domain.points.change(new.type, new.direction, new.amount)
        request = (key, "fp-" + key) if key else None
        return store.postings.NewPosting(
            domain.points.to_post(new, datetime.now(UTC)), change, request
        )

    async def scenario(ledger: Ledger) -> None:
        tiers = [domain.programs.Tier("silver", 100), domain.programs.Tier("gold", 500)]
        program = await ledger.create_program(
            ANYONE, None, NewProgram("Tiered", "EUR", tiers=tiers)
        )
        a, b, c, d, e = [
            (await ledger.create_account(ANYONE, program.id, None, {})).id for _ in range(5)
        ]
        async with db.connection(ledger.pool) as conn:

            async def alone(posting: store.postings.NewPosting) -> store.postings.Posted:
                (posted,) = await store.postings.post(conn, [posting])
                return posted

            assert (await alone(posting(a, 100))).points_after == 100
            assert (await alone(posting(b, 99, "k-b"))).points_after == 99
            assert (await alone(posting(b, 1, "k-b2"))).points_after == 100
            # A replay of a promoting posting changes nothing and logs nothing.
            replay = await alone(posting(b, 1, "k-b2"))
            assert replay.points_after is None and replay.prior is not None
            done = await store.postings.post(
                conn,
                [
                    posting(c, 300, "k-c"),
                    posting(d, 10),
                    posting(c, 300),
                    posting(e, 150),
                    posting(a, 400, "k-a"),
                ],
                wait=False,
            )
            assert [p.points_after for p in done] == [300, 10, 600, 150, 500]
        await sequence(ledger)
        page = await ledger.list_events(
            ANYONE,
            domain.events.EventFilter(frozenset(domain.events.EventType)),
            0,
            1000,
            check=False,
        )
        logged = [x for x in page.events if x.type is not domain.events.EventType.ACCOUNT_CREATED]
        assert [x.position for x in logged] == list(range(6, 6 + len(logged)))
        tx, tier = (
            domain.events.EventType.TRANSACTION_CREATED,
            domain.events.EventType.ACCOUNT_TIER_CHANGED,
        )
        assert [(x.type, x.account) for x in logged] == [
            (tx, a), (tier, a), (tx, b), (tx, b), (tier, b),
            (tx, c), (tier, c), (tx, d), (tx, c), (tier, c), (tx, e), (tier, e),
            (tx, a), (tier, a),
        ]  # fmt: skip
        snapshots = [x.snapshot for x in logged if x.type is tier]
        assert [(s.id, s.tier, s.lifetime_points) for s in snapshots] == [  # type: ignore[union-attr]
            (a, "silver", 100), (b, "silver", 100), (c, "silver", 300), (c, "gold", 600),
            (e, "silver", 150), (a, "gold", 500),
        ]  # fmt: skip
        assert snapshots[-1] == await ledger.get_account(ANYONE, a)
        assert len({x.id for x in logged}) == len(logged)

    run(url, scenario)


def test_a_request_id_reused_on_a_missing_account_is_reused_not_missing(databases):
    """A stored response comes before the account's lookup: a request id sent again with
    another (missing) account is REQUEST_ID_REUSED, not ACCOUNT_NOT_FOUND."""

    async def scenario(ledger: Ledger) -> None:
        account = await ledger.create_account(ANYONE, "prog_default", None, {})
        await ledger.create_transaction(
            ANYONE, NewTransaction(account.id, EARN, CREDIT, 5), "req-1"
        )
        missing = NewTransaction("loy_" + "M" * 20, EARN, CREDIT, 5)
        with pytest.raises(RequestIdReused):
            await ledger.create_transaction(ANYONE, missing, "req-1")

    run(databases.create(), scenario)


def test_the_benchmarks_call_of_the_kernel_is_the_services(databases):
    """store.postings.post_points_call (what the pgbench baseline runs) names every key the
    service sends: the call built from one posting's values posts it as post() would."""
    url = databases.create()

    async def scenario(ledger: Ledger) -> None:
        account = (await ledger.create_account(ANYONE, "prog_default", None, {})).id
        new = posting(account, EARN, CREDIT, 7)
        sent = store.postings.post_points_call(
            [
                {
                    "idx": "0", "id": f"'{new.ptx.id}'", "account_id": f"'{account}'",
                    "type": "'EARN'", "direction": "'CREDIT'", "amount": "7", "delta": "7",
                    "lifetime_delta": "7", "min_balance": str(new.change.min_balance),
                    "max_balance": str(new.change.max_balance), "closed_ok": "false",
                    "reason": "''", "origin_kind": "'MANUAL'", "origin_id": "''",
                    "reverses_id": "NULL::text", "rule_id": "NULL::text",
                    "rule_version": "NULL::int", "metadata": "'{}'::jsonb",
                    "create_time": "now()", "key": "'k-bench'", "fingerprint": "'f'",
                    "actor": "'bench'",
                    "event_id": f"'{new.event_id}'",
                }
            ]
        )  # fmt: skip
        async with db.connection(ledger.pool) as conn:
            row = await (await conn.execute(sent)).fetchone()
        assert (row.result, row.points_after) == ("POSTED", 7)
        assert (await ledger.get_transaction(ANYONE, new.ptx.id)).points_after == 7

    run(url, scenario)


# Each migration after 0006 builds the kernel as edits of the one before (so its body is
# written once): an edit of a released revision's text would change what new databases get
# and not old ones. A change of the kernel goes in a new migration.
FROZEN_KERNELS = [
    ("0006_posting_kernel.py", "21ed195cfdda89aca72708958cab8f8559de71a68fb5c820c2c1b297357e6333"),
    (
        "0007_kernel_returns_events.py",
        "45d6d860f6913de18e3bb48e0407f7c255fc5a2dd65853967dbc0a5c5bcbbd79",
    ),
]


@pytest.mark.parametrize(("revision", "digest"), FROZEN_KERNELS)
def test_released_kernels_are_frozen(revision, digest):
    path = Path(__file__).parents[2] / "migrations" / "versions" / revision
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernel = module.POST_POINTS if hasattr(module, "POST_POINTS") else module.post_points()
    assert hashlib.sha256(kernel.encode()).hexdigest() == digest
