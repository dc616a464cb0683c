"""The event log and its streams, end to end: each test runs its own server on a fresh
database, so it can assert the whole log, position by position."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import grpc
import psycopg
import pytest

from loyalty_service import db, domain, store
from loyalty_service.api import messages, streams
from loyalty_service.config import Settings
from loyalty_service.ledger import Ledger
from loyalty_service.ledger.requests import system_clock
from loyalty_service.pb import accounts_pb2, events_pb2, points_pb2
from loyalty_service.server import LoyaltyServer
from tests.conftest import ROOT, libpq_url
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
    FAILED_PRECONDITION,
    GRPCURL,
    INVALID,
    MERGED,
    OUT_OF_RANGE,
    REDEEM,
    Stubs,
    create_account,
    fails,
    failure,
    grpcurl,
    post,
    reverse,
)


class Replica(Stubs):
    """A server process on a database of its own, with stubs for it."""

    def __init__(self, process, database_url: str) -> None:
        super().__init__(grpc.insecure_channel(process.address))
        self.process = process
        self.database_url = database_url


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
        FAILED_PRECONDITION,
        "INSUFFICIENT_POINTS",
    )
    redeemed = post(r.points, a.id, REDEEM, 30)
    reversal = reverse(r.points, earned.id, amount=10)
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
    created = all_events(r.channel, program="prog_default", types=["loyalty.account.created"])
    assert [event_of(e).position for e in created] == [1, 2]
    assert all_events(r.channel, program="prog_other") == []
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


def test_a_commit_held_open_holds_back_nothing_and_is_not_skipped(fresh):
    """Writers queue their events and the sequencer gives positions to what has committed:
    a writer that commits late holds up no other writer, and leaves no hole that a reader
    tailing by position would skip; its events come after those that committed first."""
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
                new = domain.points.NewTransaction(
                    held_account.id, domain.points.TransactionType.EARN,
                    domain.points.Direction.CREDIT, 7,
                )  # fmt: skip
                ptx = domain.points.to_post(new, system_clock())
                change = domain.points.change(new.type, new.direction, new.amount)
                (posted,) = await store.postings.post(
                    conn, [store.postings.NewPosting(ptx, change)]
                )
                assert posted.points_after == 7
                held.append(ptx.id)
                inserted.set()
                await asyncio.to_thread(release.wait)
        held_done.set()

    holder = threading.Thread(target=lambda: asyncio.run(hold_a_posting_open()))
    holder.start()
    assert inserted.wait(10)
    with ThreadPoolExecutor(4) as pool:
        # The later writers commit while the held one is open, and are delivered.
        later = [pool.submit(post, r.points, other.id, EARN, 1) for _ in range(4)]
        later_ids = [f.result(timeout=10).id for f in later]
    got = stream.events(4)
    assert [e.position for e in got] == [3, 4, 5, 6]
    assert sorted(e.snapshot.id for e in got) == sorted(later_ids)
    assert [e.snapshot.points_after for e in got] == [1, 2, 3, 4]
    assert stream.quiet(0.3) == []
    release.set()
    assert held_done.wait(10)
    holder.join()
    (late,) = stream.events(1)
    assert (late.position, late.snapshot.id, late.snapshot.points_after) == (7, held[0], 7)
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
    beats = [stream.next(timeout=5) for _ in range(2)]
    while beats[-1].position != 4:
        beats.append(stream.next(timeout=5))
    assert all(list(b.events) == [] for b in beats) and len(beats) < 20
    post(r.points, watched.id, EARN, 1)
    (event,) = stream.events(1)
    assert event.position == 5 and stream.position == 5
    stream.cancel()


def test_a_subscriber_on_one_replica_gets_what_another_writes(fresh):
    # Two reads the log only when notified (or every 30 s), and re-listens within a second.
    one, two = fresh(), fresh(LOYALTY_EVENTS_POLL_INTERVAL="30")
    account = create_account(one.accounts)
    stream = transaction_events(two.points, account=account.id)
    posted = [post(one.points, account.id, EARN, 1).id for _ in range(10)]
    started = time.monotonic()
    assert [e.snapshot.id for e in stream.events(10)] == posted
    assert time.monotonic() - started < 5  # woken by a notification, not a poll

    # Notifications are lost while nobody listens: with every listener cut off, what is
    # written meanwhile still arrives (the reader reads once it listens again).
    with psycopg.connect(libpq_url(one.database_url), autocommit=True) as conn:
        cut = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'loyalty-events-listener'"
            " AND datname = current_database()"
        ).fetchall()
    assert len(cut) == 2
    posted += [post(one.points, account.id, EARN, 1).id for _ in range(5)]
    assert [e.snapshot.id for e in stream.events(5)] == posted[10:]
    assert stream.quiet(0.5) == []
    stream.cancel()


def test_a_slow_subscriber_is_ended_and_slows_nobody_else(fresh):
    r = fresh(LOYALTY_EVENTS_BUFFER="20", LOYALTY_EVENTS_PAGE_SIZE="20")
    account = create_account(r.accounts)
    # A subscriber that stops reading, and one that keeps up.
    slow = r.points.SubscribeTransactionEvents(points_pb2.SubscribeTransactionEventsRequest())
    start = next(slow)
    fast = transaction_events(r.points)
    # Big events, so that gRPC's flow control fills up and stops the slow stream's sends.
    metadata = {f"k{i}": "x" * 500 for i in range(40)}
    count = 300
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: post(r.points, account.id, EARN, 1, metadata=metadata),
                      range(count)))  # fmt: skip
    got = fast.events(count)
    assert [e.position for e in got] == list(range(start.position + 1, start.position + 301))
    fast.cancel()

    received, position = 0, start.position
    with pytest.raises(grpc.RpcError) as caught:
        for response in slow:
            assert [e.position for e in response.events] == list(
                range(position + 1, position + 1 + len(response.events))
            )
            received += len(response.events)
            position = response.position
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failure(error).reason == "SUBSCRIBER_TOO_SLOW"
    assert received < count
    # It resumes from the last position it received, and gets the rest exactly once.
    resumed = transaction_events(r.points, after_position=position)
    assert len(resumed.events(count - received)) == count - received
    assert resumed.quiet(0.3) == []
    resumed.cancel()


def test_shutdown_ends_streams_with_unavailable(fresh):
    r = fresh()
    streams = [transaction_events(r.points), account_events(r.accounts)]
    started = time.monotonic()
    code, output = r.process.stop()
    for stream in streams:
        found = stream.error()
        assert (found.code, found.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_STOPPING")
    assert code == 0, output
    assert time.monotonic() - started < 4  # streams do not hold the grace period (5 s)
    assert "Traceback" not in output


def test_retention_prunes_old_events_and_an_expired_position_is_out_of_range(fresh):
    r = fresh()
    account = create_account(r.accounts)
    for _ in range(3):
        post(r.points, account.id, EARN, 1)
    time.sleep(0.05)
    cut = system_clock()
    time.sleep(0.05)
    post(r.points, account.id, EARN, 1)

    async def prune(now, keep: timedelta) -> int:
        # The server's own pruning, with its clock moved on.
        async with db.create_pool(r.database_url, 1) as pool:
            return await Ledger(pool, clock=lambda: now).prune_events(keep)

    assert asyncio.run(prune(cut + timedelta(days=29), timedelta(days=30))) == 0
    assert asyncio.run(prune(cut + timedelta(days=30), timedelta(days=30))) == 4
    assert [event_of(e).position for e in all_events(r.channel)] == [5]

    for after in (0, 3):
        expired = fails(
            lambda request: next(r.points.SubscribeTransactionEvents(request)),
            points_pb2.SubscribeTransactionEventsRequest(after_position=after),
            OUT_OF_RANGE,
            "EVENT_POSITION_EXPIRED",
        )
        assert expired.metadata == {"position": str(after), "oldestPosition": "5"}
    fails(
        r.events.ListEvents,
        events_pb2.ListEventsRequest(after_position=3),
        OUT_OF_RANGE,
        "EVENT_POSITION_EXPIRED",
    )
    # Just before the oldest retained event is fine, and so is the oldest.
    stream = transaction_events(r.points, after_position=4)
    assert [e.position for e in stream.events(1)] == [5]
    stream.cancel()
    stream = transaction_events(r.points, from_oldest=True)
    assert [e.position for e in stream.events(1)] == [5]
    stream.cancel()


def test_cancelled_and_expired_streams_release_everything(databases):
    url = databases.create()

    async def run() -> None:
        settings = Settings(listen_address="127.0.0.1:0", pool_size=3, events_page_size=2)
        server = LoyaltyServer(settings, url)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await exercise(server, channel)
        finally:
            await server.stop()

    async def exercise(server: LoyaltyServer, channel: grpc.aio.Channel) -> None:
        stubs = Stubs(channel)
        accounts, points = stubs.accounts, stubs.points
        account = await accounts.CreateAccount(
            accounts_pb2.CreateAccountRequest(program="prog_default")
        )
        for _ in range(9):
            await points.CreatePointsTransaction(
                points_pb2.CreatePointsTransactionRequest(account=account.id, type=EARN, amount=1)
            )
        tasks_before = len(asyncio.all_tasks())
        subscribe = points.SubscribeTransactionEvents
        live = [subscribe(points_pb2.SubscribeTransactionEventsRequest()) for _ in range(10)]
        for call in live:
            await call.read()
        catching_up = [
            subscribe(points_pb2.SubscribeTransactionEventsRequest(from_oldest=True))
            for _ in range(5)
        ]
        for call in catching_up:
            await call.read()
            assert len((await call.read()).events) == 2  # a first page of the catch-up
        assert server.feed.subscriber_count >= 10
        for call in live + catching_up:
            call.cancel()
        expiring = subscribe(points_pb2.SubscribeTransactionEventsRequest(), timeout=0.5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in expiring:
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # Everything comes back (a health probe may hold a connection for a moment).
        deadline = time.monotonic() + 10
        while (
            server.feed.subscriber_count
            or len(asyncio.all_tasks()) > tasks_before
            or server.pool.get_stats()["pool_available"] != 3
        ):
            assert time.monotonic() < deadline, (
                server.feed.subscriber_count,
                server.pool.get_stats(),
                asyncio.all_tasks(),
            )
            await asyncio.sleep(0.05)

    asyncio.run(run())


def test_under_concurrent_writers_a_resuming_subscriber_gets_every_event_once(fresh):
    """Writers hammer two replicas while a subscriber on one of them keeps disconnecting
    and resuming from its last position: it ends with exactly the log, in order."""
    one, two = fresh(), fresh()
    accounts = [create_account(one.accounts) for _ in range(6)]
    start = transaction_events(two.points).position
    writers, per_writer = 8, 40

    def write(n: int) -> None:
        replica = (one, two)[n % 2]
        for i in range(per_writer):
            post(replica.points, accounts[(n + i) % len(accounts)].id, EARN, 1 + i % 3)

    received: list = []
    position = start
    with ThreadPoolExecutor(writers) as pool:
        done = [pool.submit(write, n) for n in range(writers)]
        while len(received) < writers * per_writer:
            stream = transaction_events(two.points, after_position=position)
            for _ in range(3):  # a few responses, then drop the connection
                response = stream.next(timeout=10)
                received += response.events
                position = response.position
                if len(received) >= writers * per_writer:
                    break
            stream.cancel()
        for future in done:
            future.result()

    assert [e.position for e in received] == list(range(start + 1, position + 1))
    listed = [event_of(e) for e in all_events(one.channel, after_position=start)]
    assert [e.id for e in received] == [e.id for e in listed]
    # Each account's points_after runs up by its amounts, in position order.
    balances: dict[str, int] = {}
    for event in received:
        balances[event.account] = balances.get(event.account, 0) + event.snapshot.amount
        assert event.snapshot.points_after == balances[event.account]
    for account in accounts:
        got = one.accounts.GetAccount(accounts_pb2.GetAccountRequest(id=account.id))
        assert got.balance == balances[account.id]


def test_stream_responses_built_from_encoded_events_are_the_messages():
    now = system_clock()
    account = domain.accounts.Account(
        id=domain.ids.new_id("loy_"), program="prog_default", customer="c", balance=5,
        status=domain.accounts.AccountStatus.ACTIVE, lifetime_points=5, tier="",
        metadata={"a": "b"}, create_time=now, update_time=now, version=3,
    )  # fmt: skip
    ptx = domain.points.PointsTransaction(
        id=domain.ids.new_id("ptx_"), account=account.id, type=domain.points.TransactionType.EARN,
        direction=domain.points.Direction.CREDIT, amount=5, points_after=5, reason="r",
        origin_kind=domain.points.OriginKind.MANUAL, origin_id="", metadata={}, create_time=now,
    )  # fmt: skip
    created = replace(
        domain.events.account_event(domain.events.EventType.ACCOUNT_CREATED, account), position=1
    )
    posted = replace(domain.events.transaction_event(ptx, account.program), position=300)
    encoder = streams.EventEncoder(capacity_bytes=1)

    def response(events: list, position: int) -> bytes:
        return streams.stream_response(encoder.events_fields(events), position)

    for _ in range(2):  # the second time from the cache (or after eviction)
        assert accounts_pb2.SubscribeAccountEventsResponse.FromString(
            response([created], 1)
        ) == accounts_pb2.SubscribeAccountEventsResponse(
            events=[messages.account_event_pb(created)], position=1
        )
        assert points_pb2.SubscribeTransactionEventsResponse.FromString(
            response([posted, posted], 2**40)
        ) == points_pb2.SubscribeTransactionEventsResponse(
            events=[messages.transaction_event_pb(posted)] * 2, position=2**40
        )
    assert streams.stream_response([], 0) == b""


def test_grpcurl_can_subscribe_and_list(fresh):
    r = fresh()
    account = create_account(r.accounts)
    run = subprocess.run(
        [GRPCURL, "-plaintext", "-max-time", "5", "-d", '{"from_oldest": true}',
         r.process.address, "vinr.loyalty.v1.LoyaltyAccounts/SubscribeAccountEvents"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "DeadlineExceeded" in run.stderr  # it streams until -max-time ends it
    decoder, text, responses = json.JSONDecoder(), run.stdout.strip(), []
    while text:
        response, end = decoder.raw_decode(text)
        responses.append(response)
        text = text[end:].strip()
    assert responses[0] == {}  # the start: position 0, before the first event
    (event,) = responses[1]["events"]
    assert (event["type"], event["position"], event["account"]) == (
        "loyalty.account.created",
        "1",
        account.id,
    )
    listed = json.loads(
        grpcurl(r.process.address, "-d", "{}", "vinr.loyalty.v1.LoyaltyEvents/ListEvents")
    )
    assert listed["events"][0]["account_event"]["id"] == event["id"]


def test_large_events_are_split_across_responses_within_the_message_limit(fresh):
    r = fresh()
    account = create_account(r.accounts)
    metadata = {f"key{i:02}": "é" * 500 for i in range(50)}  # ~50 KB an event
    live = transaction_events(r.points)
    with ThreadPoolExecutor(8) as pool:
        posted = list(
            pool.map(
                lambda _: post(r.points, account.id, EARN, 1, metadata=metadata).id, range(120)
            )
        )
    # Live, from the oldest (catch-up), and listed: all of them, no response over ~1 MiB.
    received = []
    while len(received) < 120:
        response = live.next()
        assert response.ByteSize() < 1_200_000
        received += response.events
    assert sorted(e.snapshot.id for e in received) == sorted(posted)
    live.cancel()
    oldest = transaction_events(r.points, from_oldest=True)
    assert [e.position for e in oldest.events(120)] == list(range(2, 122))
    oldest.cancel()
    listed = all_events(r.channel)
    assert [event_of(e).position for e in listed] == list(range(1, 122))


def test_start_positions(fresh):
    r = fresh()
    account = create_account(r.accounts)
    post(r.points, account.id, EARN, 1)
    # An explicit from_oldest: false is the default: from now.
    stream = transaction_events(r.points, from_oldest=False)
    assert stream.position == 2
    post(r.points, account.id, EARN, 1)
    assert [e.position for e in stream.events(1)] == [3]
    stream.cancel()
    bad = fails(
        lambda request: next(r.points.SubscribeTransactionEvents(request)),
        points_pb2.SubscribeTransactionEventsRequest(after_position=-1),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert set(bad.field_violations) == {"after_position"}
    fails(
        lambda request: next(r.accounts.SubscribeAccountEvents(request)),
        accounts_pb2.SubscribeAccountEventsRequest(after_position=4),
        OUT_OF_RANGE,
        "EVENT_POSITION_AHEAD",
    )


def test_the_readme_consumer_resumes_where_it_stopped(fresh):
    """The README's consumer sample, run as it is written."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "def consume(" in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    r = fresh()
    account = create_account(r.accounts)
    posted = [post(r.points, account.id, EARN, 1).id for _ in range(5)]

    class Enough(Exception):
        pass

    handled: list = []

    def handle(event) -> None:
        handled.append(event.snapshot.id)
        if len(handled) in (3, 5):
            raise Enough

    with pytest.raises(Enough):
        namespace["consume"](r.process.address, 0, handle)
    # Started again from the position of the third (2, 3, 4: the account's event is 1).
    with pytest.raises(Enough):
        namespace["consume"](r.process.address, 4, handle)
    assert handled == posted


def test_filters_on_streams_and_reads_bounded_by_a_window_of_positions(fresh):
    r = fresh()
    account = create_account(r.accounts)
    closing = account_events(r.accounts, program="prog_default", types=["loyalty.account.closed"])
    for _ in range(4):
        post(r.points, account.id, EARN, 1)
    r.accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=account.id))
    (closed,) = closing.events(1)
    assert (closed.type, closed.position) == ("loyalty.account.closed", 6)
    assert closing.quiet(0.3) == []
    closing.cancel()

    async def read(after: int) -> store.events.EventPage:
        async with await psycopg.AsyncConnection.connect(
            libpq_url(r.database_url), autocommit=True, row_factory=psycopg.rows.namedtuple_row
        ) as conn:
            wanted = domain.events.EventFilter(frozenset({domain.events.EventType.ACCOUNT_CLOSED}))
            return await store.events.events_page(conn, wanted, after, limit=10, window=2)

    # A read looks at two positions at most: nothing there, but it says how far it got.
    first = asyncio.run(read(0))
    assert (first.events, first.reached, first.head) == ([], 2, 6)
    last = asyncio.run(read(4))
    assert [e.position for e in last.events] == [6] and last.reached == 6


def test_the_server_prunes_on_its_own_by_the_retention_setting(fresh):
    r = fresh(LOYALTY_EVENT_RETENTION_DAYS="0.00004", LOYALTY_PRUNE_INTERVAL="0.5")  # ~3.5 s
    account = create_account(r.accounts)
    post(r.points, account.id, EARN, 1)
    assert [event_of(e).position for e in all_events(r.channel)] == [1, 2]
    deadline = time.monotonic() + 20
    while all_events(r.channel):
        assert time.monotonic() < deadline, "the events were not pruned"
        time.sleep(0.2)
    # The positions go on; a resume from before them is OUT_OF_RANGE.
    post(r.points, account.id, EARN, 1)
    assert [event_of(e).position for e in all_events(r.channel)] == [3]
    fails(
        r.events.ListEvents,
        events_pb2.ListEventsRequest(after_position=1),
        OUT_OF_RANGE,
        "EVENT_POSITION_EXPIRED",
    )


def test_hundreds_of_writers_on_two_replicas_reach_a_resuming_subscriber_once(fresh):
    """300 postings at once through two replicas on five accounts, while a subscriber on one
    of them disconnects after every response that brings events and resumes after its
    position: every event once, at positions with no gap, each account's in the order of its
    changes (points_after 1, 2, 3, ...)."""
    one, two = fresh(), fresh()
    accounts = [create_account(one.accounts).id for _ in range(5)]  # positions 1-5
    # A subscriber resumes only after a position it has seen: see 1-5 through the replica
    # it subscribes to (a resume past the head is OUT_OF_RANGE).
    assert [event_of(e).position for e in all_events(two.channel)] == [1, 2, 3, 4, 5]
    writes = 300
    received: list = []
    resumes = 0

    def subscribe() -> None:
        nonlocal resumes
        after = 5
        while len(received) < writes:
            call = two.points.SubscribeTransactionEvents(
                points_pb2.SubscribeTransactionEventsRequest(after_position=after), timeout=30
            )
            for response in call:
                received.extend(response.events)
                after = response.position
                if response.events:
                    break
            call.cancel()
            resumes += 1

    reader = threading.Thread(target=subscribe, daemon=True)
    reader.start()
    futures = [
        (one, two)[i % 2].points.CreatePointsTransaction.future(
            points_pb2.CreatePointsTransactionRequest(account=accounts[i % 5], type=EARN, amount=1)
        )
        for i in range(writes)
    ]
    posted = {f.result(timeout=60).id for f in futures}
    reader.join(timeout=30)
    assert not reader.is_alive() and resumes >= 2
    assert [e.position for e in received] == list(range(6, 6 + writes))
    assert {e.snapshot.id for e in received} == posted
    for account in accounts:
        mine = [e.snapshot.points_after for e in received if e.account == account]
        assert mine == list(range(1, writes // 5 + 1))
