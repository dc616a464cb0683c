"""The grpc.aio server: services, health, reflection, background upkeep, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import signal
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from . import db, pb, store, telemetry
from .api import LoyaltyAccounts, LoyaltyEvents, LoyaltyPrograms, PointsLedger, callers, errors
from .api.paging import PageTokens
from .api.streams import EventEncoder
from .config import Settings
from .ledger import Ledger
from .ledger.feed import EventFeed, FeedSettings
from .ledger.holds import HoldExpiry
from .ledger.sequencer import EventSequencer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.accounts_pb2.DESCRIPTOR.services_by_name["LoyaltyAccounts"].full_name,
    pb.points_pb2.DESCRIPTOR.services_by_name["PointsLedger"].full_name,
    pb.events_pb2.DESCRIPTOR.services_by_name["LoyaltyEvents"].full_name,
    pb.programs_pb2.DESCRIPTOR.services_by_name["LoyaltyPrograms"].full_name,
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LoyaltyServer:
    """One running server process: the gRPC server, its pool and its upkeep tasks."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.database_url = database_url
        self.pool = db.create_pool(
            database_url,
            settings.pool_size,
            timeout=settings.pool_timeout,
            statement_timeout=settings.statement_timeout,
        )
        self.ledger = Ledger(self.pool)
        self.feed = EventFeed(
            self.pool,
            database_url,
            FeedSettings(
                poll_interval=settings.events_poll_interval,
                buffer_size=settings.events_buffer,
                heartbeat_interval=settings.events_heartbeat,
                page_size=settings.events_page_size,
                read_interval=settings.events_read_interval,
            ),
            EventEncoder().events_fields,
        )
        self.sequencer = EventSequencer(database_url)
        self.hold_expiry = HoldExpiry(database_url)
        self.health = health.aio.HealthServicer()
        self.guard = callers.guard(settings)
        self.server = grpc.aio.server(
            interceptors=telemetry.interceptors(settings), options=channel_options(settings)
        )
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.pool.open(wait=True)
        async with self.pool.connection() as conn:
            tokens = PageTokens(await store.settings.page_token_key(conn))
        servicers = [
            (
                pb.accounts_pb2_grpc.add_LoyaltyAccountsServicer_to_server,
                LoyaltyAccounts(self.ledger, tokens, self.feed),
            ),
            (
                pb.points_pb2_grpc.add_PointsLedgerServicer_to_server,
                PointsLedger(self.ledger, tokens, self.feed),
            ),
            (
                pb.events_pb2_grpc.add_LoyaltyEventsServicer_to_server,
                LoyaltyEvents(self.ledger, tokens),
            ),
            (
                pb.programs_pb2_grpc.add_LoyaltyProgramsServicer_to_server,
                LoyaltyPrograms(self.ledger, tokens),
            ),
            (health_pb2_grpc.add_HealthServicer_to_server, self.health),
        ]
        for add_to_server, servicer in servicers:
            _add_servicer(add_to_server, servicer, self.server, self.guard)
        if self.settings.reflection:
            names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
            _add_servicer(
                reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
                reflection.aio.ReflectionServicer(names),
                self.server,
            )
        try:
            credentials = server_credentials(self.settings)
            if credentials is None:
                self.port = self.server.add_insecure_port(self.settings.listen_address)
            else:
                self.port = self.server.add_secure_port(self.settings.listen_address, credentials)
        except RuntimeError as error:
            # Port sharing is off (channel_options): a taken port is an error, not a second
            # server silently splitting the traffic.
            raise AddressInUse(
                f"cannot listen on {self.settings.listen_address}: {error}"
                " (is another server using the port?)"
            ) from None
        await self.server.start()
        self.sequencer.start()
        self.hold_expiry.start()
        self.feed.start()
        await self._set_health(SERVING)
        self._tasks = [
            asyncio.create_task(self._watch_database()),
            asyncio.create_task(self._prune()),
        ]
        log.info("serving on %s (port %d)", self.settings.listen_address, self.port)

    async def stop(self) -> None:
        """Health goes NOT_SERVING and calls are still served for the drain period, so that
        load balancers route elsewhere first; then new calls are refused, event streams end
        with UNAVAILABLE (their clients resume on another replica), and in-flight calls get
        the grace period to finish."""
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await asyncio.sleep(self.settings.shutdown_drain)
        await self.feed.close()
        await self.server.stop(self.settings.shutdown_grace)
        # After the last call: what they wrote gets its positions here, or on the replica
        # that takes over.
        await self.sequencer.close()
        await self.hold_expiry.close()
        await self.pool.close()
        log.info("stopped")

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _watch_database(self) -> None:
        """NOT_SERVING while the database does not answer, so the mesh routes elsewhere, and
        meanwhile calls fail at once (db.Pool.reachable) instead of waiting for connections.

        The probe has a connection of its own, so that a busy pool never looks like an
        outage, and runs every health_interval. A probe that does not answer within
        health_timeout is left to end in the background (psycopg's cancellation of it can
        wait seconds on a hung network) and the next one starts on a new connection. It
        counts as an outage unless calls finished on pooled connections meanwhile: then
        the database is busy, and failing every call would make that worse.
        """
        settings = self.settings
        loop = asyncio.get_running_loop()
        probe: psycopg.AsyncConnection | None = None
        running: set[asyncio.Task[psycopg.AsyncConnection]] = set()

        def forget(attempt: asyncio.Task[psycopg.AsyncConnection]) -> None:
            running.discard(attempt)
            if not attempt.cancelled():
                attempt.exception()  # looked at: an abandoned probe's error is no news

        try:
            while True:
                attempt = asyncio.create_task(self._probe(probe))
                running.add(attempt)
                attempt.add_done_callback(forget)
                await asyncio.wait({attempt}, timeout=settings.health_timeout)
                if not attempt.done():
                    attempt.cancel()  # it closes its connection when it ends
                    probe, problem = None, "no answer in time"
                    # Slow, not gone, while calls still finish on pooled connections.
                    busy = self.pool.last_success > loop.time() - settings.health_timeout
                    reachable = busy and self.pool.reachable
                elif attempt.cancelled() or attempt.exception() is not None:
                    error = None if attempt.cancelled() else attempt.exception()
                    probe, problem = None, str(error) or type(error).__name__
                    # An error the server sent (too many connections, say) says it is there.
                    reachable = getattr(error, "sqlstate", None) is not None
                else:
                    probe, reachable, problem = attempt.result(), True, ""
                if reachable != self.pool.reachable:
                    # Connections the outage broke fail their next call (UNAVAILABLE, to be
                    # retried) and the pool replaces them.
                    self.pool.reachable = reachable
                    if reachable:
                        log.warning("database reachable again: SERVING")
                    else:
                        log.warning("database unreachable (%s): NOT_SERVING", problem)
                    await self._set_health(SERVING if reachable else NOT_SERVING)
                await asyncio.sleep(settings.health_interval)
        finally:
            for attempt in running:
                attempt.cancel()
            if running:
                await asyncio.wait(set(running), timeout=1)
            await _closed(probe)

    async def _probe(self, conn: psycopg.AsyncConnection | None) -> psycopg.AsyncConnection:
        """SELECT 1 on `conn` (a new connection if None); the connection, which it closes if
        anything goes wrong, itself cancelled included."""
        try:
            if conn is None:
                conn = await psycopg.AsyncConnection.connect(
                    db.libpq_url(self.database_url), autocommit=True, connect_timeout=5
                )
            await conn.execute("SELECT 1")
            return conn
        except BaseException:
            await _closed(conn)
            raise

    async def _prune(self) -> None:
        """Forgets old request ids and deletes old events. Every replica does it; a second
        pruning finds nothing left to delete."""
        keep_requests = timedelta(hours=self.settings.request_id_retention_hours)
        keep_events = timedelta(days=self.settings.event_retention_days)
        while True:
            try:
                pruned = await self.ledger.prune_request_ids(keep_requests)
                if pruned:
                    log.info("forgot %d request ids older than %s", pruned, keep_requests)
                pruned = await self.ledger.prune_events(keep_events)
                if pruned:
                    log.info("deleted %d events older than %s", pruned, keep_events)
            except Exception as error:  # the next round tries again
                log.warning("could not prune: %s", error)
            await asyncio.sleep(self.settings.prune_interval)


async def _closed(conn: psycopg.AsyncConnection | None) -> None:
    """Closes a connection that may be broken already; None, to forget it."""
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.close()


class AddressInUse(Exception):
    """The listen address is taken."""


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    """The server's channel arguments (gRPC core's names), from the settings."""

    def ms(seconds: float) -> int:
        return int(seconds * 1000)

    return [
        # A taken port fails add_insecure_port instead of being shared with the other server.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.keepalive_min_ping_interval)),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout)),
        ("grpc.max_connection_age_ms", ms(settings.max_connection_age)),
        ("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_grace)),
        ("grpc.server_handshake_timeout_ms", ms(settings.handshake_timeout)),
    ]


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from the certificate and key files; client certificates required when a client
    CA is set (mTLS). None: plaintext."""
    if not settings.tls_cert_file:
        return None

    def read(path: str) -> bytes:
        with open(path, "rb") as file:
            return file.read()

    pair = (read(settings.tls_key_file), read(settings.tls_cert_file))
    client_ca = read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class Unprotected(Exception):
    """Asked to listen beyond loopback with no identity source and no word that the network
    is trusted."""


def check_exposure(settings: Settings) -> None:
    """Raises Unprotected, or warns (at every start) when a trusted network lets anyone who
    reaches the port act on every account."""
    if settings.authenticates or _loopback(settings.listen_address):
        return
    if not settings.trusted_network:
        raise Unprotected(
            f"refusing to listen on {settings.listen_address} with no identity source: anyone"
            " who reaches it could mint points. Configure LOYALTY_TLS_CLIENT_CA_FILE,"
            " LOYALTY_TRUST_FORWARDED_CLIENT_CERT or LOYALTY_JWT_JWKS with"
            " LOYALTY_POLICY_FILE, or set LOYALTY_TRUSTED_NETWORK=true"
        )
    log.warning(
        "no identity source: every caller on %s is `anonymous`, with every scope"
        " (LOYALTY_TRUSTED_NETWORK=true)",
        settings.listen_address,
    )


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


async def serve(settings: Settings, database_url: str) -> None:
    try:
        check_exposure(settings)
    except Unprotected as error:
        log.error("%s", error)
        raise SystemExit(2) from None
    server = LoyaltyServer(settings, database_url)
    try:
        await server.start()
    except AddressInUse as error:
        log.error("%s", error)
        await server.pool.close()
        raise SystemExit(2) from None
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down (grace %.0fs)", settings.shutdown_grace)
    await server.stop()


def _add_servicer(
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    server: grpc.aio.Server,
    guard: callers.Guard | None = None,
) -> None:
    """Registers a servicer as its generated add_*_to_server does, with its handlers guarded
    (_guarded; calls of our own services admitted by `guard` first) and, for our own
    services, streams that send the bytes their handlers yield as they are (see
    api.streams.EventEncoder). Health and reflection are open to every caller."""
    found: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    class Capture:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

        def add_registered_method_handlers(
            self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
        ) -> None:
            found[service] = handlers

    add_to_server(servicer, Capture())
    ((service, handlers),) = found.items()
    ours = service in SERVICE_NAMES
    handlers = {
        name: _guarded(f"/{service}/{name}", handler, ours, guard if ours else None)
        for name, handler in handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def _guarded(
    method: str,
    handler: grpc.RpcMethodHandler,
    yields_bytes: bool,
    guard: callers.Guard | None,
) -> grpc.RpcMethodHandler:
    """The handler, with its calls admitted by `guard` first (if any), and undecodable
    requests answered INVALID_ARGUMENT MALFORMED_REQUEST (gRPC itself answers UNKNOWN and
    logs a traceback per request)."""
    deserialize = handler.request_deserializer

    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as error:  # protobuf's DecodeError, or invalid UTF-8 in a string
            return errors.Undecodable(error)

    async def refusal(request: object, context: grpc.aio.ServicerContext) -> grpc.Status | None:
        if guard is not None and (refused := await guard.refusal(method, context)):
            return refused
        if isinstance(request, errors.Undecodable):
            return errors.malformed_request(method, request)
        return None

    if handler.request_streaming:  # reflection's one method streams both ways
        both = handler.stream_stream

        async def checked(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for request in requests:
                if isinstance(request, errors.Undecodable):
                    await context.abort_with_status(errors.malformed_request(method, request))
                yield request

        async def guarded_both(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in both(checked(requests, context), context):
                yield response

        return handler._replace(request_deserializer=parse, stream_stream=guarded_both)  # type: ignore[attr-defined]

    if not handler.response_streaming:
        unary = handler.unary_unary

        async def guarded_unary(request: object, context: grpc.aio.ServicerContext) -> object:
            if (refused := await refusal(request, context)) is not None:
                errors.end(context, refused)
                return None
            return await unary(request, context)

        return handler._replace(request_deserializer=parse, unary_unary=guarded_unary)  # type: ignore[attr-defined]

    stream = handler.unary_stream
    if inspect.isasyncgenfunction(stream):

        async def guarded_stream(request: object, context: grpc.aio.ServicerContext) -> Any:
            if (refused := await refusal(request, context)) is not None:
                errors.end(context, refused)
                return
            async for response in stream(request, context):
                yield response

    else:  # a stream that writes with context.write, as health's Watch does

        async def guarded_stream(request: object, context: grpc.aio.ServicerContext) -> Any:
            if (refused := await refusal(request, context)) is not None:
                errors.end(context, refused)
                return None
            return await stream(request, context)

    return handler._replace(  # type: ignore[attr-defined]
        request_deserializer=parse,
        unary_stream=guarded_stream,
        response_serializer=None if yields_bytes else handler.response_serializer,
    )
