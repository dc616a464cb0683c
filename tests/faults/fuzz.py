"""A request fuzzer generated from the service's proto descriptors; and what watches the
server meanwhile: its log, its memory, its health latency.

Case `index` of a run depends on nothing but the run's seed, the stride of oversized cases
and the ids of the `known` objects: `case(seed, index, known, stride)` builds the same
request again, so a failure found in a run of 100,000 can be replayed by itself:

    .venv/bin/python -m tests.faults.fuzz SEED INDEX [STRIDE]

prints what case INDEX sends. Cases are of four kinds:
- random: a message of the method's request type with each field set or not, to values at
  the edges (empty, long, non-ASCII, U+0000, id-like strings; int32/int64 limits; unknown
  enum values; Timestamps out of range; FieldMasks with random paths; page tokens of any
  shape), repeated fields and maps of 0..60 entries, nested messages;
- mutation: a valid request of the method (reaching real objects) with one field changed;
- malformed: bytes that are not a valid encoding (random, truncated, bit-flipped, invalid
  UTF-8 in a string), sent as they are;
- oversized: the requests in OVERSIZED (a ~3 MB `types`, 100,000 tiers, ...), one every
  `stride` cases.
Every request goes out as bytes over a raw `channel.unary_unary(path)` (no serializer), so
all four kinds take the same path.
"""

from __future__ import annotations

import base64
import contextlib
import math
import multiprocessing
import random
import re
import string
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import psutil
from google.protobuf import (
    duration_pb2,
    field_mask_pb2,
    message_factory,
    text_format,
    timestamp_pb2,
)
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loyalty_service.pb import (
    accounts_pb2,
    events_pb2,
    points_pb2,
    programs_pb2,
)
from tests.support import EARN, Stubs, failure, unique

OK = grpc.StatusCode.OK
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
# An error's trailers (keys and values as sent) must stay under this: gRPC clients refuse
# larger metadata by default (8 KiB soft limit), and proxies cut it.
MAX_TRAILER_BYTES = 8 << 10
UNARY_TIMEOUT = 10
# A stream's first response comes at once (its start position) or it fails: this only
# bounds a server that answers neither.
STREAM_TIMEOUT = 5


@dataclass(frozen=True)
class Method:
    name: str  # e.g. "SubscribeTransactionEvents"; unique across the services
    path: str  # e.g. "/vinr.loyalty.v1.PointsLedger/SubscribeTransactionEvents"
    request: type[Message]
    streaming: bool  # server-streaming: only the first response is read
    ours: bool  # one of our services (health is gRPC's own and has no ErrorInfo)


def _methods() -> list[Method]:
    services = [
        (accounts_pb2.DESCRIPTOR.services_by_name["LoyaltyAccounts"], True),
        (points_pb2.DESCRIPTOR.services_by_name["PointsLedger"], True),
        (programs_pb2.DESCRIPTOR.services_by_name["LoyaltyPrograms"], True),
        (events_pb2.DESCRIPTOR.services_by_name["LoyaltyEvents"], True),
        (health_pb2.DESCRIPTOR.services_by_name["Health"], False),
    ]
    found = [
        Method(
            name=method.name,
            path=f"/{service.full_name}/{method.name}",
            request=message_factory.GetMessageClass(method.input_type),
            streaming=method.server_streaming,
            ours=ours,
        )
        for service, ours in services
        for method in service.methods
        # Of health, only Check: Watch is a stream that never ends by design.
        if ours or method.name == "Check"
    ]
    assert len({m.name for m in found}) == len(found), "method names must be unique"
    return found


METHODS = _methods()
BY_NAME = {method.name: method for method in METHODS}


@dataclass(frozen=True)
class Known:
    """Real objects on the server under test, so that valid requests get past validation
    and reach the database."""

    program: str  # with tiers, a welcome rule and a payment rule; auto-enrolls
    rule: str  # the program's payment rule
    account: str  # ACTIVE, in `program`, funded
    spare: str  # another account of `program`, for close, reopen and merge
    transaction: str  # an EARN on `account`
    payment: str  # a payment that earned, for refunds
    hold: str  # a hold on `account`, for captures and releases

    def ids(self) -> list[str]:
        return [
            self.program, self.rule, self.account, self.spare, self.transaction, self.payment,
            self.hold,
        ]  # fmt: skip


def prepare(channel: grpc.Channel) -> Known:
    """Creates the objects valid requests refer to."""
    stubs = Stubs(channel)
    programs, accounts, points = stubs.programs, stubs.accounts, stubs.points
    Rule = programs_pb2.EarningRule
    program = programs.CreateProgram(
        programs_pb2.CreateProgramRequest(
            program_id=unique("prog_fuzz"),
            program=programs_pb2.Program(
                name="Fuzz",
                currency="EUR",
                auto_enroll=True,
                tiers=[
                    programs_pb2.Tier(name="Silver", lifetime_points=0),
                    programs_pb2.Tier(name="Gold", lifetime_points=1000),
                ],
                earning_rules=[
                    Rule(name="Base", trigger=Rule.TRIGGER_PAYMENT_COMPLETED, points_per_unit="1"),
                    Rule(name="Welcome", trigger=Rule.TRIGGER_ACCOUNT_CREATED, points=10),
                ],
            ),
        )
    )
    account, spare = (
        accounts.CreateAccount(
            accounts_pb2.CreateAccountRequest(program=program.id, customer=unique())
        )
        for _ in range(2)
    )
    earn = points.CreatePointsTransaction(
        points_pb2.CreatePointsTransactionRequest(account=account.id, type=EARN, amount=1000)
    )
    payment = points.RecordPayment(
        points_pb2.RecordPaymentRequest(
            payment_id=unique("pay"),
            program=program.id,
            customer=unique(),
            amount=10_000,
            currency="EUR",
            occurred_at=OCCURRED_AT,
        )
    )
    hold = points.CreateHold(
        points_pb2.CreateHoldRequest(account=account.id, amount=10, reference=unique("ord"))
    )
    return Known(
        program=program.id,
        rule=program.earning_rules[0].id,
        account=account.id,
        spare=spare.id,
        transaction=earn.id,
        payment=payment.payment.id,
        hold=hold.id,
    )


# --- values at the edges ---------------------------------------------------------------

INT32_EDGES = [0, -1, 1, 20, 21, 100, 101, 2**31 - 1, -(2**31)]
INT64_EDGES = [
    *INT32_EDGES,
    2**31,
    2**53,
    10**9,
    10**9 + 1,
    10**15,
    10**15 + 1,
    2**62,
    2**63 - 1,
    -(2**63),
]
# 2026-11-22T10:00:00Z: a recent time, fixed so that a case is the same bytes every time.
RECENT = int(datetime(2026, 11, 22, 10, tzinfo=UTC).timestamp())
# 0001-01-01 and 9999-12-31T23:59:59, what a Timestamp may hold, and one past each.
SECONDS_EDGES = [0, -1, 1, RECENT, -62135596800, -62135596801, 253402300799, 253402300800]
NANOS_EDGES = [0, 1, 999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31)]
NON_ASCII = ["é", "ß", "日本語", "🎉", "Ω≈ç√", "\u202e", "e\u0301", "\ufeff", "\U0010ffff", "Ā"]
ODD_TEXT = ["*", "%s%n", "{}", "' OR 1=1 --", "../..", "USD", "EUR", "1.5", "-0", "1e10", "NaN"]
ID_PREFIXES = ["loy_", "prog_", "ptx_", "rule_", "evt_", "pay_", "ref_"]
ALNUM = string.ascii_letters + string.digits


class Values:
    """Random field values from one Random, mostly where parsers and validators break."""

    def __init__(self, rng: random.Random, known: Known) -> None:
        self.rng = rng
        self.known = known

    def string(self) -> str:
        rng = self.rng
        kind = rng.randrange(11)
        if kind == 0:
            return ""
        if kind == 1:
            return "".join(rng.choices(string.ascii_lowercase + "_", k=rng.randint(1, 20)))
        if kind == 2:  # long: a few KB, past every length limit
            return rng.choice(["x", "é", "ab"]) * rng.randint(100, 2000)
        if kind == 3:
            return "".join(rng.choices(NON_ASCII, k=rng.randint(1, 8)))
        if kind == 4:  # PostgreSQL text cannot hold it
            return rng.choice(["\x00", "a\x00", "\x00b", "loy_\x00"])
        if kind == 5:  # the shape of an id, well formed or one off
            return rng.choice(ID_PREFIXES) + "".join(rng.choices(ALNUM, k=rng.choice([20, 19, 21])))
        if kind == 6:
            return rng.choice(["prog_default", "prog_", "prog_" + "a" * 61, "loy_", "ptx_"])
        if kind == 7:
            return rng.choice(self.known.ids())
        if kind == 8:
            return rng.choice(ODD_TEXT)
        if kind == 9:
            return self.token()
        return "".join(chr(rng.randint(1, 0xD7FF)) for _ in range(rng.randint(1, 30)))

    def token(self) -> str:
        """A page token of any shape: today's are `<base64 body>.<base64 signature>`."""
        rng = self.rng
        b64 = base64.urlsafe_b64encode(rng.randbytes(rng.randint(0, 64))).decode().rstrip("=")
        return rng.choice(
            [
                "",
                ".",
                "..",
                "x.y",
                "a.",
                ".b",
                "é.ü",
                "\x00.\x00",
                f"{b64}.{b64[:20]}",
                f"eyJ{b64}.",
                b64,
                "A" * rng.randint(100, 4000) + ".x",
                "".join(rng.choices([*NON_ASCII, "."], k=rng.randint(1, 12))),
            ]
        )

    def int32(self) -> int:
        if self.rng.random() < 0.7:
            return self.rng.choice(INT32_EDGES)
        return self.rng.randint(-(2**31), 2**31 - 1)

    def int64(self) -> int:
        if self.rng.random() < 0.7:
            return self.rng.choice(INT64_EDGES)
        return self.rng.randint(-(2**63), 2**63 - 1)

    def count(self) -> int:
        """Entries of a repeated field or map: mostly a few, sometimes past the limits."""
        return self.rng.choice([0, 0, 1, 1, 2, 3, self.rng.randint(0, 60)])

    def scalar(self, f: FieldDescriptor) -> object:
        rng = self.rng
        cpp = f.cpp_type
        if cpp == FieldDescriptor.CPPTYPE_STRING:
            if f.type == FieldDescriptor.TYPE_BYTES:
                return rng.randbytes(rng.randint(0, 40))
            return self.token() if f.name.endswith("page_token") else self.string()
        if cpp == FieldDescriptor.CPPTYPE_BOOL:
            return rng.random() < 0.5
        if cpp == FieldDescriptor.CPPTYPE_ENUM:
            if rng.random() < 0.6:
                return rng.choice(f.enum_type.values).number
            return rng.choice([-1, len(f.enum_type.values), 99, 2**31 - 1, -(2**31)])
        if cpp == FieldDescriptor.CPPTYPE_INT32:
            return self.int32()
        if cpp == FieldDescriptor.CPPTYPE_INT64:
            return self.int64()
        if cpp == FieldDescriptor.CPPTYPE_UINT32:
            return rng.choice([0, 1, 2**32 - 1, rng.randint(0, 2**32 - 1)])
        if cpp == FieldDescriptor.CPPTYPE_UINT64:
            return rng.choice([0, 1, 2**64 - 1, rng.randint(0, 2**64 - 1)])
        return rng.choice([0.0, -0.0, 1e308, float("inf"), float("nan")])  # float, double

    def fill(self, message: Message, depth: int = 0) -> None:
        """Sets each field of `message` or not, at random."""
        name = message.DESCRIPTOR.full_name
        if name == "google.protobuf.Timestamp":
            message.seconds = self.rng.choice([*SECONDS_EDGES, self.int64()])
            message.nanos = self.rng.choice([*NANOS_EDGES, self.rng.randint(0, 999_999_999)])
            return
        for f in message.DESCRIPTOR.fields:
            if self.rng.random() < 0.5:
                self.set(message, f, depth)

    def set(self, message: Message, f: FieldDescriptor, depth: int) -> None:
        """Replaces field `f` of `message` with a random value (for a repeated field or a
        map: 0..N random entries)."""
        message.ClearField(f.name)
        is_message = f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE
        if f.is_repeated and is_message and f.message_type.GetOptions().map_entry:
            entries = getattr(message, f.name)
            value_field = f.message_type.fields_by_name["value"]
            for _ in range(self.count()):
                key = self.scalar(f.message_type.fields_by_name["key"])
                if value_field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                    self.fill(entries[key], depth + 1)
                else:
                    entries[key] = self.scalar(value_field)
        elif f.is_repeated and is_message:
            for _ in range(self.count() if depth < 3 else 0):
                self.fill(getattr(message, f.name).add(), depth + 1)
        elif f.is_repeated:
            getattr(message, f.name).extend(self.scalar(f) for _ in range(self.count()))
        elif is_message:
            child = getattr(message, f.name)
            child.SetInParent()
            if f.message_type.full_name == "google.protobuf.FieldMask":
                self.mask(child, message.DESCRIPTOR)
            elif depth < 3:
                self.fill(child, depth + 1)
        else:
            setattr(message, f.name, self.scalar(f))

    def mask(self, mask: field_mask_pb2.FieldMask, owner: Descriptor) -> None:
        """Paths that name fields of the resource being updated, and paths that don't."""
        real = [
            child.name
            for f in owner.fields
            if f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE and f.message_type.fields
            for child in f.message_type.fields
        ]
        junk = ["*", "", "unknown", "a.b", "metadata.k", "tiers[0]", "Name", " name", "*.*"]
        for _ in range(self.count()):
            mask.paths.append(
                self.rng.choice(real)
                if real and self.rng.random() < 0.5
                else self.rng.choice([*junk, self.string()])
            )


# --- valid requests, one per method ----------------------------------------------------

OCCURRED_AT = timestamp_pb2.Timestamp(seconds=RECENT)  # when valid payments happened


def _id(rng: random.Random, prefix: str) -> str:
    """A fresh id for a customer, payment or request id, from the case's own Random."""
    return f"{prefix}_{rng.getrandbits(48):012x}"


def _start(rng: random.Random) -> dict[str, object]:
    """Where a subscription starts: now, the oldest event, or after position 1."""
    return rng.choice([{}, {"from_oldest": True}, {"after_position": 1}])


Mask = field_mask_pb2.FieldMask
Program, Tier, Rule = programs_pb2.Program, programs_pb2.Tier, programs_pb2.EarningRule

# A valid request for every method, reaching real objects: some succeed, some fail on the
# state (a second close, a reversal of too much), none on their shape.
VALID: dict[str, Callable[[Known, random.Random], Message]] = {
    "CreateAccount": lambda k, rng: accounts_pb2.CreateAccountRequest(
        program=k.program,
        customer=_id(rng, "cust"),
        metadata={"channel": "web"},
        request_id=_id(rng, "req"),
    ),
    "GetAccount": lambda k, rng: accounts_pb2.GetAccountRequest(id=k.account),
    "UpdateAccount": lambda k, rng: accounts_pb2.UpdateAccountRequest(
        account=accounts_pb2.Account(id=k.account, metadata={"note": "x"}),
        update_mask=Mask(paths=["metadata"]),
    ),
    "ListAccounts": lambda k, rng: accounts_pb2.ListAccountsRequest(program=k.program, page_size=5),
    "CloseAccount": lambda k, rng: accounts_pb2.CloseAccountRequest(id=k.spare),
    "ReopenAccount": lambda k, rng: accounts_pb2.ReopenAccountRequest(id=k.spare),
    # A source that does not exist: merging `spare` would freeze it for the rest of the run.
    # A mutation may still point it at a real account.
    "MergeAccounts": lambda k, rng: accounts_pb2.MergeAccountsRequest(
        source="loy_" + "".join(rng.choices(ALNUM, k=20)), target=k.account
    ),
    "SubscribeAccountEvents": lambda k, rng: accounts_pb2.SubscribeAccountEventsRequest(
        program=k.program, **_start(rng)
    ),
    "CreatePointsTransaction": lambda k, rng: points_pb2.CreatePointsTransactionRequest(
        account=k.account,
        type=EARN,
        amount=rng.randint(1, 100),
        reason="fuzz",
        origin=points_pb2.Origin(kind=points_pb2.Origin.KIND_PAYMENT, id=_id(rng, "pay")),
        request_id=_id(rng, "req"),
    ),
    "GetPointsTransaction": lambda k, rng: points_pb2.GetPointsTransactionRequest(id=k.transaction),
    "ListPointsTransactions": lambda k, rng: points_pb2.ListPointsTransactionsRequest(
        account=k.account, page_size=10
    ),
    "ReversePointsTransaction": lambda k, rng: points_pb2.ReversePointsTransactionRequest(
        id=k.transaction, amount=1, reason="fuzz"
    ),
    "RecordPayment": lambda k, rng: points_pb2.RecordPaymentRequest(
        payment_id=_id(rng, "pay"),
        program=k.program,
        customer=_id(rng, "cust"),
        amount=rng.randint(1, 100_000),
        currency="EUR",
        occurred_at=OCCURRED_AT,
        metadata={"store": "1"},
    ),
    "RecordRefund": lambda k, rng: points_pb2.RecordRefundRequest(
        refund_id=_id(rng, "ref"), payment_id=k.payment, amount=1
    ),
    "SubscribeTransactionEvents": lambda k, rng: points_pb2.SubscribeTransactionEventsRequest(
        account=k.account, **_start(rng)
    ),
    "CreateHold": lambda k, rng: points_pb2.CreateHoldRequest(
        account=k.account,
        amount=rng.randint(1, 5),
        reference=_id(rng, "ord"),
        reason="fuzz",
        ttl=duration_pb2.Duration(seconds=rng.randint(1, 900)),
    ),
    "CaptureHold": lambda k, rng: points_pb2.CaptureHoldRequest(
        id=k.hold, amount=1, request_id=_id(rng, "req")
    ),
    "ReleaseHold": lambda k, rng: points_pb2.ReleaseHoldRequest(id=k.hold),
    "GetHold": lambda k, rng: points_pb2.GetHoldRequest(id=k.hold),
    "ListHolds": lambda k, rng: points_pb2.ListHoldsRequest(account=k.account, page_size=5),
    "SubscribeHoldEvents": lambda k, rng: points_pb2.SubscribeHoldEventsRequest(
        account=k.account, **_start(rng)
    ),
    "CreateProgram": lambda k, rng: programs_pb2.CreateProgramRequest(
        program=Program(
            name="Fuzzed",
            currency="EUR",
            tiers=[Tier(name="Silver", lifetime_points=0), Tier(name="Gold", lifetime_points=9)],
            earning_rules=[Rule(trigger=Rule.TRIGGER_ACCOUNT_CREATED, points=5)],
        ),
        request_id=_id(rng, "req"),
    ),
    "GetProgram": lambda k, rng: programs_pb2.GetProgramRequest(id=k.program),
    "GetEarningRule": lambda k, rng: programs_pb2.GetEarningRuleRequest(id=k.rule),
    "ListPrograms": lambda k, rng: programs_pb2.ListProgramsRequest(page_size=5),
    "UpdateProgram": lambda k, rng: programs_pb2.UpdateProgramRequest(
        program=Program(id=k.program, name=f"Fuzz {rng.randint(0, 9)}"),
        update_mask=Mask(paths=["name"]),
    ),
    "ListEvents": lambda k, rng: events_pb2.ListEventsRequest(page_size=10),
    "Check": lambda k, rng: health_pb2.HealthCheckRequest(service=""),
}
assert set(VALID) == set(BY_NAME), "every method needs a valid request"


def mutate(message: Message, v: Values) -> str:
    """Changes one field of `message` (possibly of a nested message that is set); returns
    its path."""
    path = []
    while True:
        fields = list(message.DESCRIPTOR.fields)
        f = v.rng.choice(fields)
        path.append(f.name)
        nested = (
            f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE
            and not f.is_repeated
            and message.HasField(f.name)
            and f.message_type.full_name != "google.protobuf.FieldMask"
        )
        if nested and v.rng.random() < 0.4:
            message = getattr(message, f.name)
            continue
        v.set(message, f, depth=len(path))
        return ".".join(path)


# --- bytes that are not a valid encoding ------------------------------------------------

MALFORMED = [
    (b"\x0a\x02\xff\xfe", "field 1: a string of two bytes that are not UTF-8"),
    (b"\x0a\x04\x0a\x02\xff\xfe", "field 1 of field 1: bytes that are not UTF-8"),
    (b"\x0a\x05ab", "field 1 claims 5 bytes, 2 follow"),
    (b"\x08", "a varint's tag without its value"),
    (b"\x08" + b"\xff" * 10 + b"\x01", "a varint of 11 bytes"),
    (b"\x0f", "wire type 7, which does not exist"),
    (b"\x00", "field number 0"),
    (b"\x0b", "a group that never ends"),
    (b"\x0c", "the end of a group never started"),
    (b"\x0a\x80\x80\x80\x80\x10", "a length of 4 GiB"),
    (b"\x1a\x03\xed\xa0\x80", "field 3: an encoded UTF-16 surrogate"),
]
BAD_UTF8 = [b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"a\xf4\x90\x80\x80"]


def malformed(valid: bytes, method: Method, v: Values) -> tuple[bytes, str]:
    rng = v.rng
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 64)), "random bytes"
    if kind == 1 and len(valid) > 1:
        cut = rng.randrange(1, len(valid))
        return valid[:cut], f"a valid request cut at byte {cut} of {len(valid)}"
    if kind == 2 and valid:
        flipped = bytearray(valid)
        bits = sorted(rng.sample(range(len(valid) * 8), k=min(3, len(valid) * 8)))
        for bit in bits:
            flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped), f"a valid request with bits {bits} flipped"
    if kind == 3:
        strings = [
            f.number
            for f in method.request.DESCRIPTOR.fields
            if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated
        ]
        if strings:
            number, bad = rng.choice(strings), rng.choice(BAD_UTF8)
            tag = _varint(number << 3 | 2)
            return valid + tag + bytes([len(bad)]) + bad, f"field {number} set to {bad!r}"
    sample, note = rng.choice(MALFORMED)
    if kind == 4:
        return valid + sample, f"a valid request, then {note}"
    return sample, note


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


# --- oversized requests ----------------------------------------------------------------


def _big_metadata() -> dict[str, str]:
    return {f"{i:03d}" + "k" * 597: "v" for i in range(200)}


def _unknown_paths() -> list[str]:
    return [f"no_such_field_{i}_" + "p" * 100 for i in range(60)]


# (method, what it is, the request). Each is one the validation refuses, to see that the
# refusal stays small and the server's memory comes back.
OVERSIZED: list[tuple[str, str, Callable[[Known, random.Random], Message]]] = [
    (
        "SubscribeTransactionEvents",
        "types: 1,000,000 x 'x' (~3 MB)",
        lambda k, rng: points_pb2.SubscribeTransactionEventsRequest(types=["x"] * 1_000_000),
    ),
    (
        "SubscribeAccountEvents",
        "types: 1,000,000 x 'x' (~3 MB)",
        lambda k, rng: accounts_pb2.SubscribeAccountEventsRequest(types=["x"] * 1_000_000),
    ),
    (
        "ListEvents",
        "types: 1,000,000 x 'x' (~3 MB)",
        lambda k, rng: events_pb2.ListEventsRequest(types=["x"] * 1_000_000),
    ),
    (
        "CreateProgram",
        "100,000 empty tiers",
        lambda k, rng: programs_pb2.CreateProgramRequest(
            program=programs_pb2.Program(
                name="Big", currency="EUR", tiers=[programs_pb2.Tier()] * 100_000
            )
        ),
    ),
    (
        "CreateAccount",
        "200 metadata keys of 600 characters",
        lambda k, rng: accounts_pb2.CreateAccountRequest(
            program=k.program, customer=_id(rng, "cust"), metadata=_big_metadata()
        ),
    ),
    (
        "CreatePointsTransaction",
        "200 metadata keys of 600 characters",
        lambda k, rng: points_pb2.CreatePointsTransactionRequest(
            account=k.account, type=EARN, amount=1, metadata=_big_metadata()
        ),
    ),
    (
        "RecordPayment",
        "200 metadata keys of 600 characters",
        lambda k, rng: points_pb2.RecordPaymentRequest(
            payment_id=_id(rng, "pay"),
            program=k.program,
            customer=_id(rng, "cust"),
            amount=100,
            currency="EUR",
            occurred_at=OCCURRED_AT,
            metadata=_big_metadata(),
        ),
    ),
    (
        "UpdateProgram",
        "60 unknown update_mask paths",
        lambda k, rng: programs_pb2.UpdateProgramRequest(
            program=programs_pb2.Program(id=k.program, name="x"),
            update_mask=field_mask_pb2.FieldMask(paths=_unknown_paths()),
        ),
    ),
    (
        "UpdateAccount",
        "60 unknown update_mask paths",
        lambda k, rng: accounts_pb2.UpdateAccountRequest(
            account=accounts_pb2.Account(id=k.account),
            update_mask=field_mask_pb2.FieldMask(paths=_unknown_paths()),
        ),
    ),
    (
        "ListEvents",
        "after_position 2^63-1",
        lambda k, rng: events_pb2.ListEventsRequest(after_position=2**63 - 1),
    ),
    (
        "ListEvents",
        "after_position 2^31",
        lambda k, rng: events_pb2.ListEventsRequest(after_position=2**31),
    ),
    (
        "SubscribeTransactionEvents",
        "after_position 2^63-1",
        lambda k, rng: points_pb2.SubscribeTransactionEventsRequest(after_position=2**63 - 1),
    ),
    (
        "ListAccounts",
        "a page_token of 64 KB",
        lambda k, rng: accounts_pb2.ListAccountsRequest(page_token="A" * 65_536 + ".x"),
    ),
]


# --- cases -----------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    kind: str  # random, mutation, malformed, oversized
    method: Method
    note: str  # what was done, for people
    payload: bytes  # what goes on the wire
    message: Message | None = None  # what the payload encodes, when it is a message

    def describe(self, limit: int = 300) -> str:
        """One line: enough to write the request again by hand."""
        if self.kind == "oversized" or self.message is None:
            shown = self.payload[:40].hex(" ") + (" ..." if len(self.payload) > 40 else "")
            body = f"bytes {shown}"
        else:
            body = text_format.MessageToString(self.message, as_one_line=True, as_utf8=True)
        if len(body) > limit:
            body = body[:limit] + f"... ({len(self.payload)} bytes)"
        return f"#{self.index} {self.kind} {self.method.name} [{self.note}]: {body}"


def case(seed: int, index: int, known: Known, stride: int) -> Case:
    """Case `index` of the run with `seed`: one in every `stride` is oversized."""
    rng = random.Random(f"{seed}/{index}")
    v = Values(rng, known)
    if index % stride == stride - 1:
        name, note, build = OVERSIZED[(index // stride) % len(OVERSIZED)]
        message = build(known, rng)
        return Case(index, "oversized", BY_NAME[name], note, message.SerializeToString(), message)
    method = rng.choice(METHODS)
    valid = VALID[method.name](known, rng)
    roll = rng.random()
    if roll < 0.45:
        message = method.request()
        v.fill(message)
        return Case(index, "random", method, "", message.SerializeToString(), message)
    if roll < 0.75:
        note = mutate(valid, v)
        return Case(index, "mutation", method, note, valid.SerializeToString(), valid)
    payload, note = malformed(valid.SerializeToString(), method, v)
    return Case(index, "malformed", method, note, payload)


# --- sending ---------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    trailer_bytes: int = 0  # of an error's trailers, as sent
    problem: str = ""  # how the error breaks the ErrorInfo contract, or empty
    seconds: float = 0.0


class Client:
    """Sends cases as raw bytes and reads what came back."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self._calls: dict[str, object] = {}

    def _call(self, method: Method):
        if method.path not in self._calls:
            # No serializers: the payload goes as it is, the response stays bytes.
            make = self.channel.unary_stream if method.streaming else self.channel.unary_unary
            self._calls[method.path] = make(method.path)
        return self._calls[method.path]

    def send(self, case: Case) -> Outcome:
        started = time.monotonic()
        try:
            if case.method.streaming:
                stream = self._call(case.method)(case.payload, timeout=STREAM_TIMEOUT)
                try:
                    next(stream, None)  # the first response, or the error
                finally:
                    stream.cancel()
            else:
                self._call(case.method)(case.payload, timeout=UNARY_TIMEOUT)
        except grpc.RpcError as error:
            return Outcome(
                code=error.code(),
                trailer_bytes=trailer_size(error),
                problem=_contract_problem(case.method, error),
                seconds=time.monotonic() - started,
            )
        return Outcome(code=OK, seconds=time.monotonic() - started)


def trailer_size(error: grpc.RpcError) -> int:
    """Bytes of an error's trailers as gRPC sends them (before HPACK): grpc-status,
    grpc-message percent-encoded, and every other key and value, a `-bin` value in the
    unpadded base64 it travels in."""
    details = (error.details() or "").encode()
    # Trailers past this client's own limit never reach it: it says how long they were.
    if refused := CLIENT_REFUSED.search(details.decode()):
        return int(refused.group(1))
    size = len("grpc-status") + len(str(error.code().value[0]))
    # Percent-encoding keeps printable ASCII except '%' and turns every other byte into %XX.
    size += len("grpc-message") + sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in details)
    for key, value in error.trailing_metadata() or ():
        if key.endswith("-bin"):
            size += len(key) + math.ceil(len(value) * 4 / 3)
        else:
            size += len(key) + len(value.encode())
    return size


# The message of the RESOURCE_EXHAUSTED a client makes of metadata over its hard limit,
# e.g. "received metadata size exceeds hard limit (value length 6088888 vs. 5242880)".
CLIENT_REFUSED = re.compile(r"metadata size exceeds \w+ limit \((?:value length )?(\d+) vs\.")


def _contract_problem(method: Method, error: grpc.RpcError) -> str:
    """Every INVALID_ARGUMENT of our services carries exactly one google.rpc.ErrorInfo."""
    if not method.ours or error.code() != INVALID_ARGUMENT:
        return ""
    try:
        failure(error)
    except (AssertionError, ValueError) as broken:
        return str(broken)[:200]
    return ""


# --- watching the server: its log, memory and health -------------------------------------


# --- health and memory, watched from another process -------------------------------------


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def settled_rss(pid: int, seconds: float, below: int | None = None) -> int:
    """The process's RSS once it stops falling (or, given `below`, once under it), looking
    for at most `seconds`."""
    deadline = time.monotonic() + seconds
    last = rss(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss(pid)
        if (below is not None and now <= below) or (below is None and now >= last):
            return now
        last = now
    return rss(pid)


@dataclass
class Watch:
    """What the prober saw: every health latency (seconds), failures, the highest RSS."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    peak_rss: int = 0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.inf

    def summary(self) -> str:
        ms = [1000 * self.percentile(q) for q in (0.5, 0.99, 1.0)]
        return (
            f"health ms p50 {ms[0]:.1f} p99 {ms[1]:.1f} max {ms[2]:.1f}"
            f" (n={len(self.latencies)}, failures {len(self.failures)})"
        )


class HealthProber:
    """Calls Health/Check every `interval` on a connection of its own, and samples the
    server's RSS, from a child process: in this one, building a 3 MB request holds the GIL
    and would show up as server latency. Use as a context manager; `watch` is filled on
    exit."""

    def __init__(self, address: str, pid: int, interval: float = 0.05) -> None:
        self.address, self.pid, self.interval = address, pid, interval
        self.watch = Watch()
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._stop = context.Event()
        self._ready = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_probe,
            args=(address, pid, interval, self._stop, self._ready, send),
            daemon=True,
        )

    def __enter__(self) -> HealthProber:
        self._process.start()
        if not self._ready.wait(timeout=30):
            self._end()
            raise TimeoutError("the health prober did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._receive.poll(timeout=30):
            latencies, failures, peak = self._receive.recv()
            self.watch = Watch(latencies, failures, peak)
        self._end()

    def _end(self) -> None:
        self._stop.set()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)
        self._receive.close()


def _probe(address: str, pid: int, interval: float, stop, ready, send) -> None:
    latencies: list[float] = []
    failures: list[str] = []
    peak = 0
    server = psutil.Process(pid)
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before timing starts
        ready.set()
        while not stop.is_set():
            started = time.monotonic()
            try:
                check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError as error:
                failures.append(f"{error.code()}: {error.details()}")
            latencies.append(time.monotonic() - started)
            with contextlib.suppress(psutil.Error):  # the server is gone: the test says why
                peak = max(peak, server.memory_info().rss)
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
    send.send((latencies, failures, peak))
    send.close()


if __name__ == "__main__":
    # Shows a case of a run; the ids are placeholders for the run's own objects.
    seed, index = int(sys.argv[1]), int(sys.argv[2])
    stride = int(sys.argv[3]) if len(sys.argv) > 3 else 250
    placeholders = Known(*(f"<{name}>" for name in Known.__dataclass_fields__))
    print(case(seed, index, placeholders, stride).describe(limit=2000))
