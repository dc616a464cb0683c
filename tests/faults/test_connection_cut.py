"""The network between the service and PostgreSQL cut under load, then restored.

Cuts alternate between a sever (every connection reset, new ones refused) and a hang (no byte
goes through, new connections wait: a partition). Each time the server must report
NOT_SERVING within about a second, fail calls at once with UNAVAILABLE (DATABASE_UNAVAILABLE)
while it lasts, serve again once the network is back, and have lost or doubled nothing that
it acknowledged.
"""

from __future__ import annotations

from tests.faults.proxy import Proxy, through, upstream_of
from tests.faults.scale import pick
from tests.faults.workload import (
    HealthWatch,
    Server,
    Workload,
    assert_reported_promptly,
    disrupt,
    report,
)

# How long each cut lasts, at least.
HOLD = 2.0


def test_connection_cuts_under_load(databases, start_replica):
    url = databases.create()
    outages = []
    with Proxy(upstream_of(url)) as proxy:
        # LOYALTY_HEALTH_INTERVAL at its default: the default must be fast enough.
        server = Server(start_replica(through(url, proxy.port)))
        try:
            with (
                Workload(server.address, clients=pick(8, 24)) as workload,
                HealthWatch(server.address) as watch,
            ):
                for index in range(pick(2, 5)):
                    cut, kind = (
                        (proxy.sever, "connections reset")
                        if index % 2 == 0
                        else (proxy.hang, "connections hung")
                    )
                    outages.append(disrupt(kind, workload, watch, cut, proxy.restore, HOLD))
                workload.wait_for_progress(pick(60, 150))
            server.stop()
        except BaseException:
            server.print_output()
            raise
    report(
        "connection cuts",
        workload,
        outages,
        f"; {proxy.connections} connections, {proxy.resets} reset",
    )
    # The accounting first (directly, not through the proxy): it must hold whatever the
    # timings were.
    workload.verify(url)
    server.assert_clean_exit()
    assert_reported_promptly(outages)
