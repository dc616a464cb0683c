"""Hostile input gets a bounded INVALID_ARGUMENT (or OUT_OF_RANGE), never UNKNOWN or INTERNAL,
and never an error larger than a client accepts."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from psycopg_pool import PoolTimeout

from loyalty_service.api import errors
from loyalty_service.domain.errors import FieldViolation, InvalidArgument
from loyalty_service.pb import accounts_pb2, events_pb2, points_pb2, programs_pb2
from tests.support import (
    INVALID,
    OUT_OF_RANGE,
    account_request,
    failed_with,
    failure,
    program_request,
    unique,
)

# gRPC's default limit on the metadata a client accepts (trailers included).
CLIENT_METADATA_LIMIT = 8 << 10


@pytest.fixture(scope="module")
def roomy(service):
    """A channel that accepts trailers of any size, so that the size the server sends is
    measured instead of being turned into RESOURCE_EXHAUSTED by the client."""
    with grpc.insecure_channel(
        service.address, options=[("grpc.max_metadata_size", 64 << 20)]
    ) as ch:
        yield ch


def trailer_bytes(error: grpc.RpcError) -> int:
    """The trailers' size as sent: binary values travel base64-encoded, grpc-message
    percent-encoded."""
    size = len("grpc-status") + 2 + len("grpc-message") + len(_percent_encoded(error.details()))
    for key, value in error.trailing_metadata() or ():
        if key.endswith("-bin"):
            value = "x" * (4 * ((len(value) + 2) // 3))
        size += len(key) + len(value)
    return size


def _percent_encoded(text: str) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x25 else f"%{b:02X}" for b in text.encode())


def refused(channel, method: str, request, code=INVALID, reason="INVALID_ARGUMENT", stream=False):
    """Calls `method` with `request` (a message or raw bytes) and returns the failure,
    asserting its code, reason and size."""
    serialize = None if isinstance(request, bytes) else type(request).SerializeToString
    if stream:
        call = channel.unary_stream(method, request_serializer=serialize)
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(call(request, timeout=30)))
    else:
        call = channel.unary_unary(method, request_serializer=serialize)
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=30)
    found = failed_with(caught.value, code, reason)
    assert trailer_bytes(caught.value) < CLIENT_METADATA_LIMIT, trailer_bytes(caught.value)
    return found


ACCOUNTS = "/vinr.loyalty.v1.LoyaltyAccounts/"
POINTS = "/vinr.loyalty.v1.PointsLedger/"
PROGRAMS = "/vinr.loyalty.v1.LoyaltyPrograms/"
EVENTS = "/vinr.loyalty.v1.LoyaltyEvents/"


@pytest.mark.parametrize(
    "method",
    [
        ACCOUNTS + "GetAccount",
        ACCOUNTS + "CreateAccount",
        POINTS + "CreatePointsTransaction",
        PROGRAMS + "ListPrograms",
        EVENTS + "ListEvents",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_undecodable_requests_are_malformed_requests(roomy, method):
    # A length past the end, and a tag that never ends.
    for garbage in (b"\x0a\x05ab", b"\xff\xff\xff"):
        found = refused(roomy, method, garbage, reason="MALFORMED_REQUEST")
        assert found.metadata == {"method": method}


def test_strings_that_are_not_utf8_are_malformed_requests(roomy):
    refused(roomy, ACCOUNTS + "GetAccount", b"\x0a\x02\xff\xfe", reason="MALFORMED_REQUEST")


def test_undecodable_reflection_requests_are_malformed_requests(roomy):
    call = roomy.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([b"\x0a\x05ab"]), timeout=10))
    found = failure(caught.value)
    assert (found.code, found.reason) == (INVALID, "MALFORMED_REQUEST")


def test_undecodable_stream_requests_are_malformed_requests(roomy):
    refused(
        roomy,
        POINTS + "SubscribeTransactionEvents",
        b"\x1a\x02\xff\xfe",
        reason="MALFORMED_REQUEST",
        stream=True,
    )


def test_undecodable_requests_are_logged_once_per_interval_without_tracebacks(
    database_url, start_replica
):
    replica = start_replica(database_url, LOYALTY_LOG_LEVEL="INFO")
    with grpc.insecure_channel(replica.address) as channel:
        for _ in range(200):
            refused(
                channel, ACCOUNTS + "GetAccount", b"\x0a\x02\xff\xfe", reason="MALFORMED_REQUEST"
            )
        assert replica.health() == health_pb2.HealthCheckResponse.SERVING
    code, output = replica.stop()
    assert code == 0, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "undecodable" in line]
    assert len(lines) == 1, lines
    assert "1 undecodable request(s)" in lines[0] and "GetAccount" in lines[0]


@pytest.mark.parametrize("token", ["x.é", "é.x", "abc.\u00ff\u00fe", ".", "\U0001f600", "a" * 5000])
def test_page_tokens_of_any_text_are_invalid(roomy, token):
    for method, request in [
        (ACCOUNTS + "ListAccounts", accounts_pb2.ListAccountsRequest(page_token=token)),
        (
            POINTS + "ListPointsTransactions",
            points_pb2.ListPointsTransactionsRequest(page_token=token),
        ),
        (PROGRAMS + "ListPrograms", programs_pb2.ListProgramsRequest(page_token=token)),
        (EVENTS + "ListEvents", events_pb2.ListEventsRequest(page_token=token)),
    ]:
        found = refused(roomy, method, request)
        assert list(found.field_violations) == ["page_token"]


@pytest.mark.parametrize("position", [2**31, 2**53, 2**63 - 1])
def test_positions_far_past_the_head_are_out_of_range(roomy, position):
    for method, request, stream in [
        (EVENTS + "ListEvents", events_pb2.ListEventsRequest(after_position=position), False),
        (
            POINTS + "SubscribeTransactionEvents",
            points_pb2.SubscribeTransactionEventsRequest(after_position=position),
            True,
        ),
    ]:
        refused(
            roomy, method, request, code=OUT_OF_RANGE, reason="EVENT_POSITION_AHEAD", stream=stream
        )


def test_a_million_filter_types_cost_one_violation_and_little_time(roomy, service):
    request = points_pb2.SubscribeTransactionEventsRequest(types=["x"] * 1_000_000)
    started = time.monotonic()
    found = refused(roomy, POINTS + "SubscribeTransactionEvents", request, stream=True)
    assert time.monotonic() - started < 3
    assert found.field_violations == {"types": "has more than 20 entries"}
    found = refused(
        roomy, EVENTS + "ListEvents", events_pb2.ListEventsRequest(types=["x"] * 100_000)
    )
    assert found.field_violations == {"types": "has more than 20 entries"}
    assert service.health() == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("field", "items", "violation"),
    [
        ("tiers", [programs_pb2.Tier()] * 100_000, "has more than 20 tiers"),
        ("earning_rules", [programs_pb2.EarningRule()] * 10_000, "has more than 20 rules"),
    ],
)
def test_oversized_repeated_fields_of_a_program_are_refused_by_their_count(
    roomy, field, items, violation
):
    request = program_request(name="n", **{field: items})
    found = refused(roomy, PROGRAMS + "CreateProgram", request)
    assert found.field_violations == {f"program.{field}": violation}


def test_oversized_maps_and_masks_are_refused_by_their_count(roomy):
    for metadata in (
        {f"{i:040d}": "v" * 600 for i in range(80)},
        {f"{i:041d}": "v" for i in range(200)},
    ):
        found = refused(roomy, ACCOUNTS + "CreateAccount", account_request(metadata=metadata))
        assert found.field_violations == {"metadata": "has more than 50 keys"}

    found = refused(
        roomy,
        PROGRAMS + "UpdateProgram",
        programs_pb2.UpdateProgramRequest(
            program=programs_pb2.Program(id="prog_default"),
            update_mask=field_mask_pb2.FieldMask(paths=[f"unknown_{i}" for i in range(60)]),
        ),
    )
    assert found.field_violations == {"update_mask": "has more than 20 paths"}


def test_many_bad_entries_report_the_first_ones_and_a_count(roomy):
    # 50 keys (the most allowed), each too long and with too long a value: 100 violations.
    metadata = {f"{i:02d}" + "k" * 60: "é" * 600 for i in range(50)}
    found = refused(
        roomy,
        ACCOUNTS + "CreateAccount",
        accounts_pb2.CreateAccountRequest(
            program="prog_default", customer=unique(), metadata=metadata
        ),
    )
    assert len(found.violations) == 8
    assert found.metadata["omittedViolations"] == "92"
    assert found.message.startswith("100 problems, the first 8: metadata[")

    # Unknown mask paths, each long and not ASCII: cut to fit.
    paths = [f"{i}" + "ü" * 2000 for i in range(20)]
    found = refused(
        roomy,
        PROGRAMS + "UpdateProgram",
        programs_pb2.UpdateProgramRequest(
            program=programs_pb2.Program(id="prog_default", name="n"),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        ),
    )
    assert len(found.field_violations) == 1  # all under the one field path
    assert len(found.message.encode()) <= 400


def test_bad_tier_lists_stay_bounded(roomy):
    tiers = [programs_pb2.Tier(name="ü" * 41, lifetime_points=-1)] * 20
    found = refused(
        roomy,
        PROGRAMS + "CreateProgram",
        programs_pb2.CreateProgramRequest(
            program=programs_pb2.Program(name="n", currency="EUR", tiers=tiers)
        ),
    )
    assert len(found.violations) == 8
    assert found.metadata["omittedViolations"] == "32"


def test_database_errors_carry_retry_info():
    status = errors.status_of(PoolTimeout("no connection"), "GetAccount")
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    proto = status_pb2.Status.FromString(details)
    retry = error_details_pb2.RetryInfo()
    assert [d.Unpack(retry) for d in proto.details if d.Is(retry.DESCRIPTOR)] == [True]
    assert retry.retry_delay.seconds == 1


def test_the_largest_possible_error_fits_in_a_client_s_trailers():
    """Every cap at its worst at once: 8 violations and 8 metadata entries of long non-ASCII
    text, a long message: encoded as gRPC sends them, under 7 KiB (a client takes 8)."""
    wide = "ü" * 1000  # 2 bytes each in UTF-8, 6 when percent-encoded
    error = InvalidArgument([FieldViolation(wide + str(i), wide) for i in range(20)])
    error.metadata = {f"{wide}{i}": wide for i in range(20)}
    status = errors.to_status(error)
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    size = 4 * ((len(details) + 2) // 3) + len(_percent_encoded(status.details))
    assert size < 7 << 10, size
