"""One table from domain errors to gRPC codes, and the AIP-193 status they become."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from psycopg import InterfaceError, OperationalError
from psycopg.errors import QueryCanceled
from psycopg_pool import PoolTimeout

from .domain import (
    AccountAlreadyExists,
    CurrencyLocked,
    FailedPrecondition,
    InvalidArgument,
    LedgerError,
    NotFound,
    OutOfRange,
    ProgramAlreadyExists,
    ProgramNotActive,
    RequestIdReused,
    ServerStopping,
    SubscriberTooSlow,
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
]


def code_for(error: LedgerError) -> grpc.StatusCode:
    for kind, code in CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def _status(
    code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str], *extra: object
) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    details = []
    for detail in (info, *extra):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(proto)


def to_status(error: LedgerError) -> grpc.Status:
    extra = []
    if isinstance(error, InvalidArgument):
        extra.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in error.violations
                ]
            )
        )
    return _status(code_for(error), error.message, error.reason, error.metadata, *extra)


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[object]])
StreamHandler = TypeVar("StreamHandler", bound=Callable[..., AsyncIterator[object]])


def status_of(error: Exception, method: str) -> grpc.Status:
    """What a handler's exception becomes: domain errors by the table, an unreachable
    database UNAVAILABLE, anything else INTERNAL without details."""
    if isinstance(error, LedgerError):
        return to_status(error)
    if isinstance(error, QueryCanceled):
        log.warning("database statement timed out in %s: %s", method, error)
        return _status(
            grpc.StatusCode.UNAVAILABLE,
            "the database did not answer in time; retry with the same request_id",
            "DATABASE_TIMEOUT",
            {},
        )
    if isinstance(error, PoolTimeout | OperationalError | InterfaceError):
        log.warning("database unavailable in %s: %s", method, error)
        return _status(
            grpc.StatusCode.UNAVAILABLE,
            "the database is unavailable; retry later",
            "DATABASE_UNAVAILABLE",
            {},
        )
    log.error("unexpected error in %s", method, exc_info=error)
    return _status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL", {})


def translated(method: Handler) -> Handler:
    """Turns what a unary handler raises into a status (status_of)."""

    @functools.wraps(method)
    async def handler(self: object, request: object, context: grpc.aio.ServicerContext) -> object:
        try:
            return await method(self, request, context)
        except Exception as error:
            status = status_of(error, method.__name__)
        await context.abort_with_status(status)
        raise AssertionError("abort_with_status returns only by raising")

    return handler  # type: ignore[return-value]


def translated_stream(method: StreamHandler) -> StreamHandler:
    """Turns what a server-streaming handler raises into a status (status_of)."""

    @functools.wraps(method)
    async def handler(
        self: object, request: object, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[object]:
        try:
            async for response in method(self, request, context):
                yield response
        except Exception as error:
            status = status_of(error, method.__name__)
        else:
            return
        await context.abort_with_status(status)

    return handler  # type: ignore[return-value]
