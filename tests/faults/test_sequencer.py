"""The event log when its sequencer fails: two replicas take writes; the one that
sequences is killed (kill -9), then the next one has its database connection cut. Another
takes over each time, and the log stays whole: every ledger row has its event once, at
positions 1..N with no gap, in each account's order of changes, and a subscriber that keeps
disconnecting and resuming receives each event exactly once, in order."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import psycopg

from loyalty_service.db import SEQUENCER_LOCK_ID, libpq_url
from loyalty_service.pb import points_pb2, points_pb2_grpc
from tests.events_support import all_events, event_of
from tests.faults.scale import pick
from tests.faults.workload import Server, Workload, lock_holder
from tests.support import EARN, Stubs, create_account, post

TAKEOVER = 5.0  # seconds another replica may take to sequence (election every 0.5 s)


def _sequencing_backend(url: str) -> int | None:
    return lock_holder(url, SEQUENCER_LOCK_ID)


def _wait_for_a_new_sequencer(url: str, gone: int, within: float = TAKEOVER) -> float:
    started = time.monotonic()
    while (pid := _sequencing_backend(url)) is None or pid == gone:
        assert time.monotonic() - started < within, "no replica took over the sequencing"
        time.sleep(0.05)
    return time.monotonic() - started


class Resuming(threading.Thread):
    """Subscribes to every transaction event from the oldest, and after every `every` events
    disconnects and resumes after the last position the stream vouched for."""

    def __init__(self, address: str, every: int) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.every = every
        self.positions: list[int] = []
        self.reached = 0  # every event up to here has been received
        self.resumes = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = points_pb2_grpc.PointsLedgerStub(channel)
            while not self.stopping.is_set():
                request = points_pb2.SubscribeTransactionEventsRequest(from_oldest=True)
                if self.reached:
                    request = points_pb2.SubscribeTransactionEventsRequest(
                        after_position=self.reached
                    )
                call = stub.SubscribeTransactionEvents(request)
                received = 0
                try:
                    for response in call:
                        self.positions += [e.position for e in response.events]
                        received += len(response.events)
                        self.reached = response.position
                        if received >= self.every or self.stopping.is_set():
                            break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                finally:
                    call.cancel()
                self.resumes += 1


def test_the_sequencer_fails_over_and_the_log_stays_whole(databases, start_replica):
    url = databases.create()
    first = Server(start_replica(url))
    assert _sequencing_backend(url) is not None  # the first replica: it sequences
    second = start_replica(url)
    subscriber = Resuming(second.address, every=pick(40, 150))
    subscriber.start()
    takeovers = []
    clients = pick(3, 8)
    with (
        first.stopped_when_done(),
        Workload(first.address, clients) as near,
        Workload(second.address, clients) as far,
    ):
        near.wait_for_progress(pick(60, 150))
        sequencer = _sequencing_backend(url)
        first.kill()
        takeovers.append(_wait_for_a_new_sequencer(url, gone=sequencer))
        first.replace(start_replica(url, port=first.port))
        far.wait_for_progress(pick(60, 150))
        sequencer = _sequencing_backend(url)
        with psycopg.connect(libpq_url(url), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", [sequencer])
        takeovers.append(_wait_for_a_new_sequencer(url, gone=sequencer))
        near.wait_for_progress(pick(60, 150))
        far.wait_for_progress(pick(60, 150))
    near.verify(url)
    far.verify(url)

    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        deadline = time.monotonic() + TAKEOVER
        while conn.execute("SELECT count(*) FROM event_queue").fetchone()[0]:
            assert time.monotonic() < deadline, "queued events were left without positions"
            time.sleep(0.05)
        n, low, high, ids, head = conn.execute(
            "SELECT count(*), min(position), max(position), count(DISTINCT id),"
            " (SELECT position FROM event_log_head) FROM events"
        ).fetchone()
        assert (low, high, ids, head) == (1, n, n, n), "positions 1..N, each event once"
        missing, doubled = conn.execute(
            "SELECT (SELECT count(*) FROM points_transactions t WHERE NOT EXISTS"
            "   (SELECT FROM events e WHERE e.transaction_id = t.id)),"
            " (SELECT count(*) FROM (SELECT transaction_id FROM events"
            "   WHERE transaction_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1) AS d)"
        ).fetchone()
        assert (missing, doubled) == (0, 0), "every ledger row has its event, once"
        # Each account's events in the order of its changes: its postings in the order they
        # took its lock (the ledger row's seq), its snapshots' versions rising.
        postings_out_of_order, versions_out_of_order = conn.execute("""
            SELECT
              (SELECT count(*) FROM (
                 SELECT t.seq, lag(t.seq) OVER (PARTITION BY e.account_id ORDER BY e.position)
                   AS before
                 FROM events e JOIN points_transactions t ON t.id = e.transaction_id) AS x
               WHERE x.before > x.seq),
              (SELECT count(*) FROM (
                 SELECT (snapshot ->> 'version')::bigint AS version,
                   lag((snapshot ->> 'version')::bigint)
                     OVER (PARTITION BY account_id ORDER BY position) AS before
                 FROM events WHERE snapshot IS NOT NULL) AS y
               WHERE y.before >= y.version)
        """).fetchone()
        assert (postings_out_of_order, versions_out_of_order) == (0, 0)
        transaction_positions = [
            row[0]
            for row in conn.execute(
                "SELECT position FROM events WHERE transaction_id IS NOT NULL ORDER BY position"
            )
        ]

    deadline = time.monotonic() + 20
    while subscriber.reached < head:
        assert time.monotonic() < deadline, "the subscriber did not catch up"
        time.sleep(0.05)
    subscriber.stopping.set()
    subscriber.join(timeout=10)
    assert subscriber.positions == transaction_positions, "each event once, in order"
    assert subscriber.resumes >= 3
    print(
        f"\nsequencer fail-over: {n} events; new sequencer after"
        f" {', '.join(f'{t:.1f}' for t in takeovers)} s; subscriber resumed"
        f" {subscriber.resumes} times"
    )
    first.assert_clean_exit()


def test_a_frozen_sequencer_gives_way_without_its_connection_closing(databases, start_replica):
    """The sequencing process stops (SIGSTOP: as a host that vanished, its connection stays
    open, nothing closes it). PostgreSQL ends its idle session (idle_session_timeout), and
    with it the lock; the other replica takes over and the events written meanwhile get
    their positions. Woken again, the first one sequences no more."""
    url = databases.create()
    first = start_replica(url)
    frozen = _sequencing_backend(url)
    assert frozen is not None
    second = start_replica(url)
    first.process.send_signal(signal.SIGSTOP)
    try:
        taken_over = _wait_for_a_new_sequencer(url, gone=frozen, within=15.0)
        with grpc.insecure_channel(second.address) as channel:
            stubs = Stubs(channel)
            account = create_account(stubs.accounts)
            post(stubs.points, account.id, EARN, 1)
            listed = all_events(channel)
        assert [event_of(e).type for e in listed] == [
            "loyalty.account.created", "points_transaction.created"
        ]  # fmt: skip
    finally:
        first.process.send_signal(signal.SIGCONT)
    assert taken_over < 15.0
    first.wait_serving()
    assert _sequencing_backend(url) not in (None, frozen)
