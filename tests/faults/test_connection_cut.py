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
from tests.faults.workload import Server, assert_reported_promptly, outages_under_load, report

# How long each cut lasts, at least.
HOLD = 2.0


def test_connection_cuts_under_load(databases, start_replica):
    url = databases.create()
    with Proxy(upstream_of(url)) as proxy:
        # LOYALTY_HEALTH_INTERVAL at its default: the default must be fast enough.
        server = Server(start_replica(through(url, proxy.port)))
        cuts = [
            ("connections reset", proxy.sever, proxy.restore)
            if index % 2 == 0
            else ("connections hung", proxy.hang, proxy.restore)
            for index in range(pick(2, 5))
        ]
        workload, outages = outages_under_load(server, cuts, HOLD)
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
