"""The hold expiry job when the replica that runs it is killed (kill -9) as holds come due:
the other replica takes over, and every expiry is recorded once, with its event, the
accounts' held points and versions following."""

from __future__ import annotations

import time
from datetime import timedelta

import grpc
import psycopg
from google.protobuf import duration_pb2

from loyalty_service.db import HOLD_EXPIRY_LOCK_ID, libpq_url
from tests.api.test_holds import balances, checks_clean, hold
from tests.faults.workload import lock_holder
from tests.support import Stubs, funded_account, get

TAKEOVER = 5.0  # seconds another replica may take to run the job (election every 0.5 s)


def _recorded(url: str) -> tuple[int, int]:
    """Holds recorded as EXPIRED, and their points_hold.expired events (queued or in the
    log)."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM points_holds WHERE status = 'EXPIRED'),"
            " (SELECT count(*) FROM events WHERE type = 'points_hold.expired')"
            " + (SELECT count(*) FROM event_queue WHERE type = 'points_hold.expired')"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_the_expiry_job_survives_its_replica_killed(databases, start_replica):
    url = databases.create()
    first = start_replica(url)
    deadline = time.monotonic() + TAKEOVER
    while (runner := lock_holder(url, HOLD_EXPIRY_LOCK_ID)) is None:
        assert time.monotonic() < deadline, "no replica runs the hold expiry"
        time.sleep(0.05)
    second = start_replica(url)
    with grpc.insecure_channel(second.address) as channel:
        stubs = Stubs(channel)
        accounts = [funded_account(stubs.accounts, stubs.points, 100) for _ in range(40)]
        ttl = duration_pb2.Duration(seconds=2)
        holds = [hold(stubs.points, a.id, 10, ttl=ttl) for a in accounts for _ in range(5)]
        # Killed as soon as its job has begun recording them (or just after it finished).
        deadline = time.monotonic() + 10
        while _recorded(url)[0] == 0:
            assert time.monotonic() < deadline, "the job recorded nothing"
            time.sleep(0.005)
        first.kill()
        at_kill = _recorded(url)[0]
        deadline = time.monotonic() + TAKEOVER + 5
        while _recorded(url)[0] < len(holds):
            assert time.monotonic() < deadline, "the other replica did not finish the job"
            time.sleep(0.05)
        assert lock_holder(url, HOLD_EXPIRY_LOCK_ID) not in (None, runner)
        assert _recorded(url) == (200, 200)
        for account in accounts:
            assert balances(stubs.accounts, account.id) == (100, 0, 100)
            # Created, earned, 5 holds, then its expiries recorded in one or more steps.
            assert 8 <= get(stubs.accounts, account.id).version <= 12
    checks_clean(url, expiry_grace=timedelta(0))
    print(f"\nhold expiry: its replica killed with {at_kill} of 200 expiries recorded")
