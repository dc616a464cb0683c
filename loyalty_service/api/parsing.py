"""Request parsing every servicer shares: Violations and its field checks, ids, masks."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from .. import domain
from ..domain.errors import FieldViolation, InvalidArgument
from ..domain.events import EventFilter, EventType

E = TypeVar("E")

# The seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z: what a datetime holds.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
# PostgreSQL text cannot hold U+0000, so a string with one could never be stored.
_NUL_MESSAGE = "must not contain the character U+0000"


@dataclass
class Violations:
    """Collects the problems with a request, so one error names them: the first
    domain.errors.MAX_VIOLATIONS of them, and how many more there were."""

    found: list[FieldViolation] = field(default_factory=list)
    omitted: int = 0

    def add(self, field_path: str, description: str) -> None:
        self.extend([FieldViolation(field_path, description)])

    def extend(self, violations: Sequence[FieldViolation]) -> None:
        room = max(0, domain.errors.MAX_VIOLATIONS - len(self.found))
        self.found.extend(violations[:room])
        self.omitted += max(0, len(violations) - room)

    def raise_if_any(self) -> None:
        if self.found:
            raise InvalidArgument(self.found, self.omitted)

    def at_most(self, field_path: str, values: Sized, maximum: int, what: str) -> None:
        """Refuses the request at once if a repeated field or map has more than `maximum`
        entries: checked before any work per entry, so a huge request costs no more than a
        small one."""
        if len(values) > maximum:
            self.add(field_path, f"has more than {maximum} {what}")
            self.raise_if_any()

    # -- field checks; each returns the cleaned value ---------------------------------------

    def id(
        self, field_path: str, value: str, pattern: re.Pattern[str], *, required: bool = True
    ) -> str:
        if not value:
            if required:
                self.add(field_path, "is required")
        elif not pattern.fullmatch(value):  # not match: `$` also matches before a "\n"
            self.add(field_path, f"is not a valid id (expected {pattern.pattern})")
        return value

    def text(self, field_path: str, value: str, max_length: int) -> str:
        if len(value) > max_length:
            self.add(field_path, f"is longer than {max_length} characters")
        if "\x00" in value:
            self.add(field_path, _NUL_MESSAGE)
        return value

    def metadata(self, field_path: str, value: Mapping[str, str]) -> dict[str, str]:
        self.at_most(field_path, value, domain.ids.MAX_METADATA_KEYS, "keys")
        for key, item in value.items():
            if not key or len(key) > domain.ids.MAX_METADATA_KEY_LENGTH:
                self.add(
                    f"{field_path}[{key[:40]}]",
                    f"keys must be 1 to {domain.ids.MAX_METADATA_KEY_LENGTH} characters",
                )
            if len(item) > domain.ids.MAX_METADATA_VALUE_LENGTH:
                self.add(
                    f"{field_path}[{key[:40]}]",
                    f"values must be at most {domain.ids.MAX_METADATA_VALUE_LENGTH} characters",
                )
            if "\x00" in key or "\x00" in item:
                self.add(f"{field_path}[{key[:40]}]", _NUL_MESSAGE)
        return dict(value)

    def amount(self, field_path: str, value: int) -> int:
        if not 1 <= value <= domain.ids.MAX_AMOUNT:
            self.add(field_path, f"must be between 1 and {domain.ids.MAX_AMOUNT}")
        return value

    def timestamp(self, field_path: str, value: Timestamp) -> datetime | None:
        """The time, or None (with a violation) if it is outside what a datetime holds."""
        if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 10**9):
            self.add(field_path, "must be between 0001-01-01 and 9999-12-31 (UTC)")
            return None
        return value.ToDatetime(tzinfo=UTC)

    def ttl(self, field_path: str, value: Duration) -> int:
        """A time-to-live in whole seconds (domain.programs.ttl_violations)."""
        self.extend(domain.programs.ttl_violations(field_path, value.seconds, value.nanos))
        return value.seconds

    def request_id(self, value: str) -> str:
        return self.text("request_id", value, domain.ids.MAX_REQUEST_ID_LENGTH)

    def enum(
        self, field_path: str, value: int, table: Mapping[int, E], *, required: bool
    ) -> E | None:
        if value == 0:
            if required:
                self.add(field_path, "is required")
            return None
        if value not in table:
            self.add(field_path, f"has unknown value {value}")
            return None
        return table[value]


def customer(violations: Violations, field_path: str, value: str) -> str | None:
    return violations.text(field_path, value, domain.accounts.MAX_CUSTOMER_LENGTH) or None


def currency(v: Violations, field_path: str, value: str) -> str:
    if not value:
        v.add(field_path, "is required")
    elif not domain.programs.CURRENCY.fullmatch(value):
        v.add(field_path, "must be an ISO 4217 code: three uppercase letters")
    return value


MAX_MASK_PATHS = 20


def update_paths(v: Violations, paths: Sequence[str], updatable: Sequence[str]) -> set[str]:
    """The fields an update_mask names, `*` standing for all of `updatable`; each unknown
    path is a violation. Empty when the mask is: the caller then takes the fields set."""
    v.at_most("update_mask", paths, MAX_MASK_PATHS, "paths")
    named = set(paths)
    if "*" in named:
        named = (named - {"*"}) | set(updatable)
    for unknown in sorted(named - set(updatable)):
        v.add("update_mask", f"cannot update {unknown[:100]!r}; updatable: {', '.join(updatable)}")
    return named


def single_id(field_path: str, value: str, pattern: re.Pattern[str]) -> str:
    v = Violations()
    v.id(field_path, value, pattern)
    v.raise_if_any()
    return value


def event_filter(
    v: Violations, program: str, account: str, types: Sequence[str], allowed: frozenset[EventType]
) -> EventFilter:
    """The filters of a subscription or list; no types means all of `allowed`."""
    program = v.id("program", program, domain.ids.PROGRAM_ID, required=False)
    account = v.id("account", account, domain.ids.ACCOUNT_ID, required=False)
    chosen = set()
    v.at_most("types", types, MAX_TYPE_FILTERS, "entries")
    for index, name in enumerate(types):
        if name in allowed:
            chosen.add(EventType(name))
        else:
            names = ", ".join(sorted(allowed))
            v.add(f"types[{index}]", f"{name[:100]!r} is not one of: {names}")
    return EventFilter(
        types=frozenset(chosen) or allowed, program=program or None, account=account or None
    )


# Entries of an event filter's `types` (there are fewer event types: a longer list repeats).
MAX_TYPE_FILTERS = 20
