"""kill -9 of the server under load: nothing acknowledged is lost, nothing is doubled."""

from __future__ import annotations

import time

from tests.faults.scale import pick
from tests.faults.workload import Server, Workload


def test_kill_9_under_load_loses_and_doubles_nothing(databases, start_replica):
    url = databases.create()
    server = Server(start_replica(url))
    kills = pick(3, 10)
    downtimes = []
    with server.stopped_when_done(), Workload(server.address, clients=pick(8, 24)) as workload:
        for _ in range(kills):
            # Enough acknowledged since the last restart that the kill lands amid calls.
            workload.wait_for_progress(pick(60, 150))
            server.kill()
            killed = time.monotonic()
            # On the same address, so the clients' channels reconnect to it by themselves.
            server.replace(start_replica(url, port=server.port))
            downtimes.append(time.monotonic() - killed)
        workload.wait_for_progress(pick(60, 150))
    print(
        f"\nkill -9: {workload.summary(disruptions=kills)}; down for"
        f" {', '.join(f'{d:.1f}' for d in downtimes)} s (from the kill to SERVING again)"
    )
    workload.verify(url)
    server.assert_clean_exit()
