"""One table from domain errors to gRPC codes, and the AIP-193 status they become."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from psycopg import InterfaceError, OperationalError
from psycopg.errors import QueryCanceled
from psycopg_pool import PoolTimeout

from .. import db
from ..domain.errors import (
    AccountAlreadyExists,
    CurrencyLocked,
    FailedPrecondition,
    InvalidArgument,
    LedgerError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProgramAlreadyExists,
    ProgramNotActive,
    RequestIdReused,
    ServerStopping,
    SubscriberTooSlow,
    Unauthenticated,
)

DOMAIN = "loyalty.vinr.v1"
log = logging.getLogger(__name__)

# First match wins, so subclasses come before their bases.
CODES: list[tuple[type[LedgerError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestIdReused, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AccountAlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (ProgramAlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (CurrencyLocked, grpc.StatusCode.FAILED_PRECONDITION),
    (ProgramNotActive, grpc.StatusCode.FAILED_PRECONDITION),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (SubscriberTooSlow, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ServerStopping, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]


def code_for(error: LedgerError) -> grpc.StatusCode:
    for kind, code in CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


# An error travels in the trailers, which clients refuse past 8 KiB (gRPC's default), and
# then see RESOURCE_EXHAUSTED instead. The message goes twice (grpc-message, percent-encoded:
# up to 3 bytes a byte; and in grpc-status-details-bin, base64: 4 bytes per 3), so with these
# caps, in UTF-8 bytes, the worst error's trailers stay under 7 KiB (a test builds it):
#   message 400 -> 1,200 + 533; ErrorInfo 8 x (32 + 160) metadata -> ~2,100;
#   BadRequest domain.errors.MAX_VIOLATIONS (8) x (80 + 160) -> ~2,600; RetryInfo a few bytes.
MAX_MESSAGE_BYTES = 400
MAX_METADATA_ENTRIES = 8
MAX_METADATA_KEY_BYTES = 32
MAX_METADATA_VALUE_BYTES = 160
MAX_FIELD_BYTES = 80
MAX_DESCRIPTION_BYTES = 160
# How long a caller should wait before retrying while the database is unavailable.
RETRY_DELAY_SECONDS = 1


def clipped(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8 (on a character boundary), marked with
    an ellipsis where it was cut."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "…"


def _status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
    *extra: object,
    retry: bool = False,
) -> grpc.Status:
    """The status an error becomes (AIP-193): one ErrorInfo, then `extra` details; every
    text cut to its byte limit above."""
    entries = list(metadata.items())[:MAX_METADATA_ENTRIES]
    info = error_details_pb2.ErrorInfo(
        reason=reason,
        domain=DOMAIN,
        metadata={
            clipped(key, MAX_METADATA_KEY_BYTES): clipped(value, MAX_METADATA_VALUE_BYTES)
            for key, value in entries
        },
    )
    if retry:
        delay = duration_pb2.Duration(seconds=RETRY_DELAY_SECONDS)
        extra = (*extra, error_details_pb2.RetryInfo(retry_delay=delay))
    details = []
    for detail in (info, *extra):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    message = clipped(message, MAX_MESSAGE_BYTES)
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(proto)


def to_status(error: LedgerError) -> grpc.Status:
    extra = []
    if isinstance(error, InvalidArgument):
        extra.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=clipped(v.field, MAX_FIELD_BYTES),
                        description=clipped(v.description, MAX_DESCRIPTION_BYTES),
                    )
                    for v in error.violations
                ]
            )
        )
    return _status(code_for(error), error.message, error.reason, error.metadata, *extra)


class Undecodable:
    """A request whose bytes are not its message (server._guarded parses requests into
    this instead of failing the call with UNKNOWN)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class CountingLog:
    """Logs a kind of failure at most once per interval, with a count: a client sending
    garbage, or every call during an outage, must not flood the log with a line each."""

    def __init__(self, what: str, interval: float) -> None:
        self.what = what
        self.interval = interval
        self._count = 0
        self._logged_at = -interval

    def record(self, method: str, error: BaseException) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at >= self.interval:
            log.warning(
                "%d %s since the last such line (one per %.0f s at most); the latest, in %s: %s",
                self._count,
                self.what,
                self.interval,
                method,
                clipped(str(error), 200),
            )
            self._count = 0
            self._logged_at = now


UNDECODABLE_LOG = CountingLog("undecodable request(s)", interval=60.0)
TIMEOUT_LOG = CountingLog("database statement time-out(s)", interval=5.0)
UNAVAILABLE_LOG = CountingLog("call(s) failed with the database unavailable", interval=5.0)


def malformed_request(method: str, request: Undecodable) -> grpc.Status:
    UNDECODABLE_LOG.record(method, request.error)
    return _status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "the request could not be decoded as the method's message",
        "MALFORMED_REQUEST",
        {"method": method},
    )


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[object]])
StreamHandler = TypeVar("StreamHandler", bound=Callable[..., AsyncIterator[object]])


# Database failures a retry may get past: UNAVAILABLE, with RetryInfo. First match wins, and
# QueryCanceled (a statement timeout) is an OperationalError, so it comes first.
_DATABASE_FAILURES: list[tuple[tuple[type[Exception], ...], CountingLog, str, str]] = [
    (
        (QueryCanceled,),
        TIMEOUT_LOG,
        "the database did not answer in time; retry with the same request_id",
        "DATABASE_TIMEOUT",
    ),
    (
        (PoolTimeout, OperationalError, InterfaceError),
        UNAVAILABLE_LOG,
        "the database is unavailable; retry with the same request_id",
        "DATABASE_UNAVAILABLE",
    ),
]


def status_of(error: Exception, method: str) -> grpc.Status:
    """What a handler's exception becomes: domain errors by the table, an unreachable
    database UNAVAILABLE, anything else INTERNAL without details."""
    if isinstance(error, LedgerError):
        return to_status(error)
    for kinds, counting_log, message, reason in _DATABASE_FAILURES:
        if isinstance(error, kinds):
            counting_log.record(method, error)
            return _status(grpc.StatusCode.UNAVAILABLE, message, reason, {}, retry=True)
    log.error("unexpected error in %s", method, exc_info=error)
    return _status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL", {})


def end(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """Ends the call with `status` when its handler returns. Unlike abort_with_status this
    raises nothing: the exception's traceback would keep the call's frames, and with them
    its request, alive until the cycle collector runs (a 3 MB request holds ~40 MB)."""
    context.set_trailing_metadata(status.trailing_metadata)
    context.set_code(status.code)
    context.set_details(status.details)


def _bound_waits(context: grpc.aio.ServicerContext) -> None:
    """The call waits for database connections no longer than its deadline (db.Pool)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining < _NO_DEADLINE:
        db.call_deadline.set(asyncio.get_running_loop().time() + remaining)


# What time_remaining() says of a call without a deadline is a very large number.
_NO_DEADLINE = 10**9


def translated(method: Handler) -> Handler:
    """Turns what a unary handler raises into a status (status_of)."""

    @functools.wraps(method)
    async def handler(self: object, request: object, context: grpc.aio.ServicerContext) -> object:
        _bound_waits(context)
        try:
            return await method(self, request, context)
        except Exception as error:
            status = status_of(error, method.__name__)
        end(context, status)
        return None

    return handler  # type: ignore[return-value]


def translated_stream(method: StreamHandler) -> StreamHandler:
    """Turns what a server-streaming handler raises into a status (status_of)."""

    @functools.wraps(method)
    async def handler(
        self: object, request: object, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[object]:
        _bound_waits(context)
        try:
            async for response in method(self, request, context):
                yield response
        except Exception as error:
            end(context, status_of(error, method.__name__))

    return handler  # type: ignore[return-value]
