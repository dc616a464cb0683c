"""A TCP proxy between the service and PostgreSQL that a test can cut and restore.

It listens on 127.0.0.1 and forwards each connection to the database server (over TCP, or
over the Unix socket the embedded PostgreSQL listens on). A test then:

- `sever()`: resets every open connection (RST, as when a database host or a NAT forgets
  them) and refuses new ones: they are accepted and reset at once;
- `hang()`: stops forwarding in both directions and leaves new connections waiting, as a
  network partition does: nothing fails, nothing answers;
- `restore()`: forwards again (connections that hung carry on where they stopped).

Each connection is served by one thread that owns both its sockets (so no socket is closed
under another thread's feet) and looks at the proxy's state every POLL seconds.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url

from loyalty_service.db import libpq_url

POLL = 0.05
OPEN, SEVERED, HANGING = "open", "severed", "hanging"


def upstream_of(database_url: str) -> str | tuple[str, int]:
    """Where a PostgreSQL URL connects: a Unix socket path, or a TCP host and port."""
    params = conninfo_to_dict(libpq_url(database_url))
    host = str(params.get("host") or "/tmp")
    port = int(params.get("port") or 5432)
    if host.startswith("/"):
        return f"{host}/.s.PGSQL.{port}"
    return host, port


def through(database_url: str, port: int) -> str:
    """The same URL, through a proxy on 127.0.0.1:port."""
    url = make_url(database_url)
    query = {k: v for k, v in url.query.items() if k != "host"}
    return url.set(host="127.0.0.1", port=port, query=query).render_as_string(hide_password=False)


def _reset(sock: socket.socket) -> None:
    """Closes with RST rather than FIN: the peer's next read or write fails at once."""
    with contextlib.suppress(OSError):  # already reset by the peer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Proxy:
    def __init__(self, upstream: str | tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._state = OPEN
        # Bumped by every sever: a connection made before it is reset when it sees the change.
        self._epoch = 0
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0  # accepted, over the proxy's life
        self.resets = 0  # connections it reset
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def sever(self) -> None:
        with self._lock:
            self._state = SEVERED
            self._epoch += 1

    def hang(self) -> None:
        with self._lock:
            self._state = HANGING

    def restore(self) -> None:
        with self._lock:
            self._state = OPEN

    def close(self) -> None:
        """Resets every connection and stops listening; waits for its threads."""
        self._closing.set()
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _now(self) -> tuple[str, int]:
        with self._lock:
            return self._state, self._epoch

    def _count_reset(self) -> None:
        with self._lock:
            self.resets += 1

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:  # the poll's time-out, or a connection aborted before its accept
                continue
            self.connections += 1
            state, epoch = self._now()
            if state == SEVERED:
                self._count_reset()
                _reset(client)
                continue
            thread = threading.Thread(
                target=self._serve, args=(client, epoch), name="proxy-link", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, epoch: int) -> None:
        upstream: socket.socket | None = None
        ended_by_us = False  # a sever or close: reset; an end by either peer: pass it on
        try:
            while True:  # accept-and-hang: a connection made while hanging waits here
                state, now = self._now()
                if self._closing.is_set() or now != epoch:
                    ended_by_us = True
                    return
                if state == OPEN:
                    break
                time.sleep(POLL)
            upstream = self._connect()
            for sock in (client, upstream):
                sock.settimeout(10)  # bounds a sendall to a peer that stopped reading
            while True:
                state, now = self._now()
                if self._closing.is_set() or now != epoch:
                    ended_by_us = True
                    return
                if state == HANGING:
                    time.sleep(POLL)
                    continue
                readable, _, _ = select.select([client, upstream], [], [], POLL)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except OSError:
            ended_by_us = True  # a reset or a dead upstream: reset the other side too
        finally:
            if ended_by_us:
                self._count_reset()
            for sock in (client, upstream):
                if sock is None:
                    continue
                if ended_by_us:
                    _reset(sock)
                else:
                    sock.close()

    def _connect(self) -> socket.socket:
        if isinstance(self.upstream, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.connect(self.upstream)
        except OSError:
            sock.close()
            raise
        return sock
