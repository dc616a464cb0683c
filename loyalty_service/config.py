"""Settings from the environment, as one frozen dataclass."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    # PostgreSQL URL; None starts the embedded server in data_dir.
    database_url: str | None = None
    data_dir: Path = Path(".loyalty-data")
    # Loopback only by default: anywhere else needs an identity source, or trusted_network.
    listen_address: str = "localhost:50051"
    # -- who is calling (README "Callers"); several sources may be on at once ------------
    # PEM files: serve TLS with this certificate and key; with a client CA, require client
    # certificates it signed (mTLS), whose URI SAN, else subject CN, is the caller.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # The caller from the x-forwarded-client-cert header of a mesh sidecar that terminated
    # mTLS (Envoy, Istio). Only behind such a sidecar: anyone else could forge the header.
    trust_forwarded_client_cert: bool = False
    # Bearer tokens (JWT) signed by a key of this JWKS (a file, or an http(s) URL), from
    # this issuer, for this audience; exp and nbf are checked with `jwt_leeway` seconds.
    jwt_jwks: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway: float = 30.0
    jwt_algorithms: str = "RS256,ES256"
    # TOML: which identities get which scopes and programs (README "Callers"). Required
    # with an identity source; without one every caller is `anonymous`, with every scope.
    policy_file: str = ""
    # Listening beyond loopback with no identity source refuses to start unless this says
    # the network itself lets only trusted callers in.
    trusted_network: bool = False
    # gRPC server reflection (grpcurl's `list` and `describe`).
    reflection: bool = True
    pool_size: int = 10
    # Seconds a statement (including its wait for a row lock) may take before it is cancelled.
    statement_timeout: float = 10.0
    # Seconds a call may wait for a pooled connection (also in a group-commit queue); a
    # call's own deadline, if sooner, wins.
    pool_timeout: float = 5.0
    # SIGTERM: health goes NOT_SERVING, the server keeps serving for `shutdown_drain` seconds
    # (so that load balancers and meshes stop routing to it), then refuses new calls and gives
    # in-flight calls `shutdown_grace` seconds to finish.
    shutdown_drain: float = 2.0
    shutdown_grace: float = 10.0
    # Seconds between database probes that drive the health status, and how long one may
    # take: the database unreachable is NOT_SERVING within about their sum.
    health_interval: float = 0.25
    health_timeout: float = 0.5
    # Connections (gRPC channel arguments). Clients may ping this often, also with no call in
    # flight (more often is "too many pings": GOAWAY).
    keepalive_min_ping_interval: float = 10.0
    # The server pings a connection idle this long, and closes it if no answer comes within
    # keepalive_timeout: dead peers (a vanished pod, a dropped NAT entry) are let go.
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    # A connection is asked to go away (GOAWAY) after this many seconds, so that long-lived
    # clients spread over new replicas; in-flight calls get the grace to finish, and event
    # streams still open then end with UNAVAILABLE (their clients resume).
    max_connection_age: float = 300.0
    max_connection_age_grace: float = 30.0
    # Seconds a new connection has to complete its handshake.
    handshake_timeout: float = 10.0
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

    @property
    def authenticates(self) -> bool:
        """Whether any identity source is on."""
        return bool(self.tls_client_ca_file or self.trust_forwarded_client_cert or self.jwt_jwks)

    def __post_init__(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("LOYALTY_TLS_CERT_FILE and LOYALTY_TLS_KEY_FILE go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("LOYALTY_TLS_CLIENT_CA_FILE needs LOYALTY_TLS_CERT_FILE and _KEY_FILE")
        if self.jwt_jwks and not (self.jwt_issuer and self.jwt_audience):
            raise ValueError("LOYALTY_JWT_JWKS needs LOYALTY_JWT_ISSUER and LOYALTY_JWT_AUDIENCE")
        if self.authenticates != bool(self.policy_file):
            raise ValueError(
                "LOYALTY_POLICY_FILE goes with an identity source (LOYALTY_TLS_CLIENT_CA_FILE,"
                " LOYALTY_TRUST_FORWARDED_CLIENT_CERT or LOYALTY_JWT_JWKS), and each of those"
                " with a policy file"
            )
        if not 0 <= self.jwt_leeway <= 300:
            raise ValueError("LOYALTY_JWT_LEEWAY must be 0 to 300 seconds")
        if self.request_id_retention_hours < 24:
            raise ValueError("LOYALTY_REQUEST_ID_RETENTION_HOURS must be at least 24 (AIP-155)")
        if self.pool_size < 1:
            raise ValueError("LOYALTY_POOL_SIZE must be at least 1")
        if not 1 <= self.events_page_size <= self.events_buffer:
            # A subscriber just done with a full catch-up page must have room for more.
            raise ValueError("need 1 <= LOYALTY_EVENTS_PAGE_SIZE <= LOYALTY_EVENTS_BUFFER")
        intervals = (
            self.events_heartbeat,
            self.events_poll_interval,
            self.prune_interval,
            self.pool_timeout,
            self.health_interval,
            self.health_timeout,
            self.keepalive_min_ping_interval,
            self.keepalive_time,
            self.keepalive_timeout,
            self.max_connection_age,
            self.handshake_timeout,
        )
        if not all(math.isfinite(x) and x > 0 for x in intervals):
            raise ValueError("intervals and time-outs must be positive numbers")
        if min(self.shutdown_drain, self.shutdown_grace, self.max_connection_age_grace) < 0:
            raise ValueError("shutdown and connection-age grace periods must not be negative")
        if self.event_retention_days <= 0 or self.events_read_interval < 0:
            raise ValueError(
                "LOYALTY_EVENT_RETENTION_DAYS must be positive and"
                " LOYALTY_EVENTS_READ_INTERVAL not negative"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Each setting from LOYALTY_<NAME> (e.g. pool_size from LOYALTY_POOL_SIZE), else its
        default."""
        env = os.environ if environ is None else environ
        defaults = cls()
        values: dict[str, object] = {}
        for setting in fields(cls):
            text = env.get(f"LOYALTY_{setting.name.upper()}")
            if text is None:
                continue
            kind = type(getattr(defaults, setting.name))
            if setting.name == "database_url":
                values[setting.name] = text or None
            elif kind is bool:
                values[setting.name] = text.lower() in ("1", "true", "yes")
            else:
                values[setting.name] = kind(text)
        return cls(**values)
