"""Paging (AIP-158): signed page tokens, and keyset pages cut to fit one response."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message

from .. import domain
from ..domain.errors import FieldViolation, InvalidArgument
from ..domain.ids import Page
from ..pb import accounts_pb2, points_pb2, programs_pb2

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100

# Bytes of items in one list response: well under gRPC's default 4 MiB message limit on the
# client, as a page of 100 items with large metadata could be ~10 MB.
MAX_RESPONSE_BYTES = 1 << 20
T = TypeVar("T")
M = TypeVar("M", bound=Message)
F = TypeVar("F")


# Page tokens: opaque, signed, and bound to the query they continue.
class PageTokens:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def page_size(self, requested: int) -> int:
        if requested < 0:
            raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
        return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)

    def encode(self, after: int | None, query: object) -> str:
        if after is None:
            return ""
        body = _b64(json.dumps({"after": after, "query": domain.codec.digest(query)[:16]}).encode())
        return f"{body}.{self._sign(body)}"

    def decode(self, token: str, query: object) -> int | None:
        """The keyset position a token continues from; None for the first page."""
        if not token:
            return None
        body, _, signature = token.partition(".")
        # Bytes, not str: compare_digest refuses a str that is not ASCII.
        if not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            raise _bad_token("is not a page token issued by this service")
        try:
            payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            after, digest = int(payload["after"]), payload["query"]
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise _bad_token("is malformed") from None
        if digest != domain.codec.digest(query)[:16]:
            raise _bad_token("belongs to a request with other filters")
        return after

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest()[:18])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _bad_token(description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", description)])


async def page(
    tokens: PageTokens,
    request: accounts_pb2.ListAccountsRequest
    | points_pb2.ListPointsTransactionsRequest
    | points_pb2.ListHoldsRequest
    | programs_pb2.ListProgramsRequest,
    method: str,
    where: F,
    list_page: Callable[[F, int | None, int], Awaitable[Page[T]]],
    to_pb: Callable[[T], M],
) -> tuple[list[M], str]:
    """One keyset page for a list request, as messages; its token is bound to the method and
    filters. A page cut short by size goes on, in the next, after its last item."""
    limit = tokens.page_size(request.page_size)
    query = [method, where]
    page = await list_page(where, tokens.decode(request.page_token, query), limit)
    messages = fit([to_pb(item) for item in page.items])
    next_after = page.next_after
    if len(messages) < len(page.items):
        next_after = page.keys[len(messages) - 1]
    return messages, tokens.encode(next_after, query)


def fit(messages: list[M]) -> list[M]:
    """The first messages that fit in one response (MAX_RESPONSE_BYTES), at least one."""
    size = 0
    for count, message in enumerate(messages):
        size += message.ByteSize()
        if count and size > MAX_RESPONSE_BYTES:
            return messages[:count]
    return messages
