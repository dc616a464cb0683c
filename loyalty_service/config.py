"""Settings from the environment, as one frozen dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    # PostgreSQL URL; None starts the embedded server in data_dir.
    database_url: str | None = None
    data_dir: Path = Path(".loyalty-data")
    listen_address: str = "[::]:50051"
    pool_size: int = 10
    # Seconds a statement (including its wait for a row lock) may take before it is cancelled.
    statement_timeout: float = 10.0
    # Seconds in-flight calls get to finish after SIGTERM.
    shutdown_grace: float = 10.0
    # Seconds between database probes that drive the health status.
    health_interval: float = 2.0
    # Hours a request_id is remembered (AIP-155 asks for at least 24).
    request_id_retention_hours: float = 48.0
    # Days events are kept in the event log (a resume from an older position is OUT_OF_RANGE).
    event_retention_days: float = 30.0
    # Seconds between prunings of old events and request ids.
    prune_interval: float = 3600.0
    # Seconds between streams' heartbeats when there is nothing to send.
    events_heartbeat: float = 15.0
    # Events a subscriber may have waiting before it is ended with RESOURCE_EXHAUSTED.
    events_buffer: int = 10_000
    # Seconds between reads of the event log when no notification comes.
    events_poll_interval: float = 1.0
    # Seconds the event reader waits after each read: under load, fewer and fuller responses
    # (each streamed message costs the server ~0.1 ms of CPU) for a little more latency.
    events_read_interval: float = 0.05
    # Events read from the log at a time (catch-up pages; the feed's reads).
    events_page_size: int = 500
    log_level: str = "INFO"
    # Print a span per RPC to stdout (OpenTelemetry console exporter).
    trace_console: bool = False

    def __post_init__(self) -> None:
        if self.request_id_retention_hours < 24:
            raise ValueError("LOYALTY_REQUEST_ID_RETENTION_HOURS must be at least 24 (AIP-155)")
        if self.pool_size < 1:
            raise ValueError("LOYALTY_POOL_SIZE must be at least 1")
        if not 1 <= self.events_page_size <= self.events_buffer:
            # A subscriber just done with a full catch-up page must have room for more.
            raise ValueError("need 1 <= LOYALTY_EVENTS_PAGE_SIZE <= LOYALTY_EVENTS_BUFFER")
        if min(self.events_heartbeat, self.events_poll_interval, self.prune_interval) <= 0:
            raise ValueError("intervals must be positive")
        if self.event_retention_days <= 0 or self.events_read_interval < 0:
            raise ValueError(
                "LOYALTY_EVENT_RETENTION_DAYS must be positive and"
                " LOYALTY_EVENTS_READ_INTERVAL not negative"
            )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()
        return cls(
            database_url=env.get("LOYALTY_DATABASE_URL") or None,
            data_dir=Path(env.get("LOYALTY_DATA_DIR", str(defaults.data_dir))),
            listen_address=env.get("LOYALTY_LISTEN_ADDRESS", defaults.listen_address),
            pool_size=int(env.get("LOYALTY_POOL_SIZE", defaults.pool_size)),
            statement_timeout=float(
                env.get("LOYALTY_STATEMENT_TIMEOUT", defaults.statement_timeout)
            ),
            shutdown_grace=float(env.get("LOYALTY_SHUTDOWN_GRACE", defaults.shutdown_grace)),
            health_interval=float(env.get("LOYALTY_HEALTH_INTERVAL", defaults.health_interval)),
            request_id_retention_hours=float(
                env.get("LOYALTY_REQUEST_ID_RETENTION_HOURS", defaults.request_id_retention_hours)
            ),
            event_retention_days=float(
                env.get("LOYALTY_EVENT_RETENTION_DAYS", defaults.event_retention_days)
            ),
            prune_interval=float(env.get("LOYALTY_PRUNE_INTERVAL", defaults.prune_interval)),
            events_heartbeat=float(env.get("LOYALTY_EVENTS_HEARTBEAT", defaults.events_heartbeat)),
            events_buffer=int(env.get("LOYALTY_EVENTS_BUFFER", defaults.events_buffer)),
            events_poll_interval=float(
                env.get("LOYALTY_EVENTS_POLL_INTERVAL", defaults.events_poll_interval)
            ),
            events_read_interval=float(
                env.get("LOYALTY_EVENTS_READ_INTERVAL", defaults.events_read_interval)
            ),
            events_page_size=int(env.get("LOYALTY_EVENTS_PAGE_SIZE", defaults.events_page_size)),
            log_level=env.get("LOYALTY_LOG_LEVEL", defaults.log_level),
            trace_console=env.get("LOYALTY_TRACE_CONSOLE", "") in ("1", "true", "yes"),
        )
