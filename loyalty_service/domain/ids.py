"""Ids, the limits every request shares, and pages of results."""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


MAX_AMOUNT = 1_000_000_000


# Far below the int64 limit, so that no sum of balances can overflow.
MAX_BALANCE = 1_000_000_000_000_000


MAX_METADATA_KEYS = 50


MAX_METADATA_KEY_LENGTH = 40


MAX_METADATA_VALUE_LENGTH = 500


MAX_REQUEST_ID_LENGTH = 100


_ID_ALPHABET = string.ascii_letters + string.digits


_ID_LENGTH = 20


ACCOUNT_ID = re.compile(r"^loy_[A-Za-z0-9]{20}$")


TRANSACTION_ID = re.compile(r"^ptx_[A-Za-z0-9]{20}$")


PROGRAM_ID = re.compile(r"^prog_[A-Za-z0-9_]{1,60}$")


HOLD_ID = re.compile(r"^hold_[A-Za-z0-9]{20}$")


def new_id(prefix: str) -> str:
    """`prefix` and 20 random letters and digits (about 119 bits)."""
    number = int.from_bytes(secrets.token_bytes(16))
    letters = []
    for _ in range(_ID_LENGTH):
        number, digit = divmod(number, len(_ID_ALPHABET))
        letters.append(_ID_ALPHABET[digit])
    return prefix + "".join(letters)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    # The keyset position after the last item, or None at the end.
    next_after: int | None
    # Each item's keyset position, for a page that is cut short.
    keys: list[int] = field(default_factory=list)


RULE_ID = re.compile(r"^rule_[A-Za-z0-9]{20}$")
