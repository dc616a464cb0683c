"""The grpc.aio server: services, health, reflection, background upkeep, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import db, store, telemetry
from .api import LoyaltyAccounts, LoyaltyEvents, LoyaltyPrograms, PointsLedger
from .config import Settings
from .convert import EventEncoder, PageTokens
from .events import EventFeed, FeedSettings
from .ledger import Ledger
from .pb import (
    accounts_pb2,
    accounts_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    points_pb2,
    points_pb2_grpc,
    programs_pb2,
    programs_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    accounts_pb2.DESCRIPTOR.services_by_name["LoyaltyAccounts"].full_name,
    points_pb2.DESCRIPTOR.services_by_name["PointsLedger"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["LoyaltyEvents"].full_name,
    programs_pb2.DESCRIPTOR.services_by_name["LoyaltyPrograms"].full_name,
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LoyaltyServer:
    """One running server process: the gRPC server, its pool and its upkeep tasks."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.pool = db.create_pool(
            database_url, settings.pool_size, statement_timeout=settings.statement_timeout
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
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(interceptors=telemetry.interceptors(settings))
        self.port = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.pool.open(wait=True)
        async with self.pool.connection() as conn:
            tokens = PageTokens(await store.page_token_key(conn))
        _add_servicer(
            accounts_pb2_grpc.add_LoyaltyAccountsServicer_to_server,
            LoyaltyAccounts(self.ledger, tokens, self.feed),
            self.server,
        )
        _add_servicer(
            points_pb2_grpc.add_PointsLedgerServicer_to_server,
            PointsLedger(self.ledger, tokens, self.feed),
            self.server,
        )
        events_pb2_grpc.add_LoyaltyEventsServicer_to_server(
            LoyaltyEvents(self.ledger, tokens), self.server
        )
        programs_pb2_grpc.add_LoyaltyProgramsServicer_to_server(
            LoyaltyPrograms(self.ledger, tokens), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(self.settings.listen_address)
        await self.server.start()
        self.feed.start()
        await self._set_health(SERVING)
        self._tasks = [
            asyncio.create_task(self._watch_database()),
            asyncio.create_task(self._prune()),
        ]
        log.info("serving on %s (port %d)", self.settings.listen_address, self.port)

    async def stop(self) -> None:
        """Stops taking calls, ends event streams with UNAVAILABLE (their clients resume on
        another replica), lets in-flight calls finish within the grace period."""
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await self.feed.close()
        await self.server.stop(self.settings.shutdown_grace)
        await self.pool.close()
        log.info("stopped")

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _watch_database(self) -> None:
        """NOT_SERVING while the database does not answer, so the mesh routes elsewhere."""
        serving = True
        while True:
            await asyncio.sleep(self.settings.health_interval)
            try:
                async with asyncio.timeout(self.settings.health_interval + 1):
                    async with self.pool.connection() as conn:
                        await conn.execute("SELECT 1")
                healthy = True
            except Exception as error:  # any failure to answer means not serving
                healthy = False
                if serving:
                    log.warning("database unreachable: %s", error)
            if healthy != serving:
                serving = healthy
                await self._set_health(SERVING if healthy else NOT_SERVING)
                log.info("health: %s", "SERVING" if healthy else "NOT_SERVING")

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


async def serve(settings: Settings, database_url: str) -> None:
    server = LoyaltyServer(settings, database_url)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down (grace %.0fs)", settings.shutdown_grace)
    await server.stop()


def _add_servicer(
    add_to_server: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server
) -> None:
    """Registers a servicer as its generated add_*_to_server does, except that its streams
    send the bytes their handlers yield as they are (see convert.EventEncoder)."""
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
    handlers = {
        name: handler._replace(response_serializer=None)  # type: ignore[attr-defined]
        if handler.response_streaming
        else handler
        for name, handler in handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
