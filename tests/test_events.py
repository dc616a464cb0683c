"""The event log and its streams, end to end: each test runs its own server on a fresh
database, so it can assert the whole log, position by position."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psycopg
import pytest

from loyalty_service import domain, store
from loyalty_service.ledger import system_clock
from loyalty_service.pb import (
    accounts_pb2,
    accounts_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
)
from tests.conftest import libpq_url
from tests.events_support import (
    Stream,
    account_events,
    all_events,
    event_of,
    transaction_events,
)
from tests.support import (
    ACTIVE,
    CLOSED,
    EARN,
    MERGED,
    REDEEM,
    create_account,
    fails,
    post,
)

OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Replica:
    """A server process on a database of its own, with stubs for it."""

    def __init__(self, process, database_url: str) -> None:
        self.process = process
        self.database_url = database_url
        self.channel = grpc.insecure_channel(process.address)
        self.accounts = accounts_pb2_grpc.LoyaltyAccountsStub(self.channel)
        self.points = points_pb2_grpc.PointsLedgerStub(self.channel)
        self.events = events_pb2_grpc.LoyaltyEventsStub(self.channel)


@pytest.fixture
def fresh(databases, start_replica):
    """Starts servers on one new database: fresh(**env), again for a second replica."""
    url = databases.create()
    channels = []

    def start(**env: str) -> Replica:
        replica = Replica(start_replica(url, **env), url)
        channels.append(replica.channel)
        return replica

    yield start
    for channel in channels:
        channel.close()


def test_every_change_appends_its_event_in_commit_order(fresh):
    r = fresh()
    account_stream = account_events(r.accounts)
    ledger_stream = transaction_events(r.points)

    a = create_account(r.accounts, customer="cust_a", request_id="create-a")
    create_account(r.accounts, customer="cust_a", request_id="create-a")  # a replay
    updated = r.accounts.UpdateAccount(
        accounts_pb2.UpdateAccountRequest(
            account=accounts_pb2.Account(id=a.id, metadata={"tier": "gold"})
        )
    )
    earned = post(r.points, a.id, EARN, 100, request_id="earn-1")
    post(r.points, a.id, EARN, 100, request_id="earn-1")  # a replay
    fails(
        r.points.CreatePointsTransaction,
        points_pb2.CreatePointsTransactionRequest(account=a.id, type=REDEEM, amount=1000),
        grpc.StatusCode.FAILED_PRECONDITION,
        "INSUFFICIENT_POINTS",
    )
    redeemed = post(r.points, a.id, REDEEM, 30)
    reversal = r.points.ReversePointsTransaction(
        points_pb2.ReversePointsTransactionRequest(id=earned.id, amount=10)
    )
    r.accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=a.id))
    r.accounts.ReopenAccount(accounts_pb2.ReopenAccountRequest(id=a.id))
    b = create_account(r.accounts, customer="cust_b")
    post(r.points, b.id, EARN, 5)
    r.accounts.MergeAccounts(accounts_pb2.MergeAccountsRequest(source=b.id, target=a.id))

    got = account_stream.events(7)
    assert [(e.type, e.account, e.position) for e in got] == [
        ("loyalty.account.created", a.id, 1),
        ("loyalty.account.updated", a.id, 2),
        ("loyalty.account.closed", a.id, 6),
        ("loyalty.account.reopened", a.id, 7),
        ("loyalty.account.created", b.id, 8),
        ("loyalty.account.merged", b.id, 10),
        ("loyalty.account.updated", a.id, 11),
    ]
    # Snapshots: the account as of each change, with its version (postings count too).
    snapshots = [(e.snapshot.status, e.snapshot.balance, e.snapshot.version) for e in got]
    assert snapshots == [
        (ACTIVE, 0, 1),
        (ACTIVE, 0, 2),
        (CLOSED, 60, 6),
        (ACTIVE, 60, 7),
        (ACTIVE, 0, 1),
        (MERGED, 0, 3),
        (ACTIVE, 65, 8),
    ]
    assert got[1].snapshot.metadata == {"tier": "gold"} and got[1].snapshot == updated
    assert got[5].snapshot.merged_into == a.id
    assert all(e.id.startswith("evt_") and len(e.id) == 24 for e in got)
    assert len({e.id for e in got}) == len(got)
    assert all(e.program == "prog_default" for e in got)

    moved = ledger_stream.events(4)
    assert [(e.type, e.account, e.position) for e in moved] == [
        ("points_transaction.created", a.id, 3),
        ("points_transaction.created", a.id, 4),
        ("points_transaction.created", a.id, 5),
        ("points_transaction.created", b.id, 9),
    ]
    assert [e.snapshot for e in moved[:3]] == [earned, redeemed, reversal]
    assert [e.snapshot.points_after for e in moved] == [100, 70, 60, 5]
    # A transaction's snapshot is as it was posted, even after its account was merged.
    assert moved[3].snapshot.account == b.id and not moved[3].snapshot.original_account

    listed = [event_of(e) for e in all_events(r.channel)]
    assert [e.position for e in listed] == list(range(1, 12))
    assert listed == sorted(got + moved, key=lambda e: e.position)
    account_stream.cancel()
    ledger_stream.cancel()


def test_list_events_pages_filters_and_positions(fresh):
    r = fresh()
    a, b = create_account(r.accounts), create_account(r.accounts)
    for _ in range(3):
        post(r.points, a.id, EARN, 1)
        post(r.points, b.id, EARN, 1)
    every = all_events(r.channel)
    assert [event_of(e).position for e in every] == list(range(1, 9))

    first = r.events.ListEvents(events_pb2.ListEventsRequest(page_size=3))
    assert [event_of(e).position for e in first.events] == [1, 2, 3]
    assert first.position == 3 and first.next_page_token
    rest = r.events.ListEvents(
        events_pb2.ListEventsRequest(page_size=100, page_token=first.next_page_token)
    )
    assert [event_of(e).position for e in rest.events] == list(range(4, 9))
    assert rest.position == 8 and rest.next_page_token == ""

    only_a = all_events(r.channel, account=a.id, types=["points_transaction.created"])
    assert [event_of(e).position for e in only_a] == [3, 5, 7]
    after = all_events(r.channel, account=b.id, after_position=6)
    assert [event_of(e).position for e in after] == [8]
    # Filtered: the position still reaches the newest event, for a subscription to go on.
    tail = r.events.ListEvents(events_pb2.ListEventsRequest(account=a.id, after_position=7))
    assert list(tail.events) == [] and tail.position == 8

    bad = fails(
        r.events.ListEvents,
        events_pb2.ListEventsRequest(types=["loyalty.account.created", "nope"]),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert set(bad.field_violations) == {"types[1]"}
    fails(
        r.events.ListEvents,
        events_pb2.ListEventsRequest(page_token=first.next_page_token, account=a.id),
        INVALID,
        "INVALID_ARGUMENT",
    )
    ahead = fails(
        r.events.ListEvents,
        events_pb2.ListEventsRequest(after_position=9),
        OUT_OF_RANGE,
        "EVENT_POSITION_AHEAD",
    )
    assert ahead.metadata == {"position": "9", "newestPosition": "8"}
    with pytest.raises(grpc.RpcError) as caught:
        next(
            r.points.SubscribeTransactionEvents(
                points_pb2.SubscribeTransactionEventsRequest(types=["loyalty.account.created"])
            )
        )
    assert caught.value.code() == INVALID


def test_a_commit_held_open_holds_back_later_ones_and_nothing_is_skipped(fresh):
    """Positions are taken under the event log head's lock, held to commit: a writer that
    commits late cannot leave a hole that a reader tailing by position would skip."""
    r = fresh()
    held_account, other = create_account(r.accounts), create_account(r.accounts)
    stream = transaction_events(r.points)
    inserted, release, held_done = threading.Event(), threading.Event(), threading.Event()
    held: list[str] = []

    async def hold_a_posting_open() -> None:
        # The service's own posting statement, in a transaction this test keeps open.
        async with await psycopg.AsyncConnection.connect(
            libpq_url(r.database_url), autocommit=True
        ) as conn:
            conn.row_factory = psycopg.rows.namedtuple_row
            async with conn.transaction():
                new = domain.NewTransaction(held_account.id, domain.TransactionType.EARN,
                                            domain.Direction.CREDIT, 7)  # fmt: skip
                ptx = domain.to_post(new, system_clock())
                change = domain.change(new.type, new.direction, new.amount)
                posted = await store.post_transaction(conn, store.NewPosting(ptx, change))
                assert posted.points_after == 7
                held.append(ptx.id)
                inserted.set()
                await asyncio.to_thread(release.wait)
        held_done.set()

    holder = threading.Thread(target=lambda: asyncio.run(hold_a_posting_open()))
    holder.start()
    assert inserted.wait(10)
    with ThreadPoolExecutor(4) as pool:
        later = [pool.submit(post, r.points, other.id, EARN, 1) for _ in range(4)]
        time.sleep(1.5)
        # The later writers wait for the held one's commit, and nothing is delivered.
        assert not any(f.done() for f in later)
        assert stream.quiet(0.2) == []
        release.set()
        assert held_done.wait(10)
        later_ids = [f.result(timeout=10).id for f in later]
    holder.join()
    got = stream.events(5)
    assert [e.position for e in got] == [3, 4, 5, 6, 7]
    assert got[0].snapshot.id == held[0]
    assert sorted(e.snapshot.id for e in got[1:]) == sorted(later_ids)
    assert [e.snapshot.points_after for e in got[1:]] == [1, 2, 3, 4]
    stream.cancel()


def test_resume_after_a_disconnect_mid_catch_up_and_mid_stream(fresh):
    r = fresh(LOYALTY_EVENTS_PAGE_SIZE="4")
    account = create_account(r.accounts)
    posted = [post(r.points, account.id, EARN, 1).id for _ in range(10)]

    def receive(stream: Stream, count: int) -> list[str]:
        return [e.snapshot.id for e in stream.events(count)]

    stream = transaction_events(r.points, from_oldest=True)
    first = stream.next()  # the first catch-up page
    assert [e.snapshot.id for e in first.events] == posted[:4] and first.position == 5
    stream.cancel()

    stream = transaction_events(r.points, after_position=first.position)
    received = receive(stream, 6)
    assert received == posted[4:]
    posted += [post(r.points, account.id, EARN, 1).id for _ in range(3)]
    received += receive(stream, 3)
    last = stream.position
    stream.cancel()

    posted += [post(r.points, account.id, EARN, 1).id for _ in range(5)]
    stream = transaction_events(r.points, after_position=last)
    received += receive(stream, 5)
    assert stream.quiet(0.5) == []
    assert posted[4:] == received
    stream.cancel()


def test_heartbeats_carry_the_position_of_an_idle_stream(fresh):
    r = fresh(LOYALTY_EVENTS_HEARTBEAT="0.3")
    watched, busy = create_account(r.accounts), create_account(r.accounts)
    stream = transaction_events(r.points, account=watched.id)
    assert stream.position == 2
    post(r.points, busy.id, EARN, 1)
    post(r.points, busy.id, EARN, 1)
    # Events it does not want still move its position on, so a resume skips them.
    beats = [stream.next(timeout=5) for _ in range(3)]
    assert all(list(b.events) == [] for b in beats)
    assert beats[-1].position == 4
    post(r.points, watched.id, EARN, 1)
    (event,) = stream.events(1)
    assert event.position == 5 and stream.position == 5
    stream.cancel()
