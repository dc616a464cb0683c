"""Holds through the real server: codes, reasons, exact balances, events, races."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from loyalty_service import db
from loyalty_service.ledger.checks import find_violations
from loyalty_service.pb import (
    accounts_pb2,
    events_pb2,
    events_pb2_grpc,
    points_pb2,
    programs_pb2,
)
from tests.api.test_concurrency import at_once, settle
from tests.support import (
    FAILED_PRECONDITION,
    INVALID,
    NOT_FOUND,
    REDEEM,
    create_account,
    failed_with,
    fails,
    funded_account,
    get,
    post,
    reverse,
    unique,
)

Hold = points_pb2.Hold
HELD, CAPTURED, RELEASED, EXPIRED = (
    Hold.STATUS_HELD, Hold.STATUS_CAPTURED, Hold.STATUS_RELEASED, Hold.STATUS_EXPIRED,
)  # fmt: skip


def hold_request(account: str, amount: int, **fields) -> points_pb2.CreateHoldRequest:
    fields.setdefault("reference", unique("auth"))
    return points_pb2.CreateHoldRequest(account=account, amount=amount, **fields)


def hold(points, account: str, amount: int, **fields) -> points_pb2.Hold:
    return points.CreateHold(hold_request(account, amount, **fields))


def capture(points, hold_id: str, amount: int | None = None, **fields) -> points_pb2.Hold:
    request = points_pb2.CaptureHoldRequest(id=hold_id, **fields)
    if amount is not None:
        request.amount = amount
    return points.CaptureHold(request)


def release(points, hold_id: str, **fields) -> points_pb2.Hold:
    return points.ReleaseHold(points_pb2.ReleaseHoldRequest(id=hold_id, **fields))


def balances(accounts, account_id: str) -> tuple[int, int, int]:
    account = get(accounts, account_id)
    return account.balance, account.held_points, account.available_balance


def checks_clean(database_url: str, expiry_grace: timedelta = timedelta(minutes=5)) -> None:
    async def run() -> list[str]:
        async with db.create_pool(database_url, size=1) as pool:
            return await find_violations(pool, expiry_grace)

    assert asyncio.run(run()) == []


def test_a_hold_reserves_points_until_captured(accounts, points, database_url):
    account = funded_account(accounts, points, 1000)
    held = hold(points, account.id, 300, reason="order 17", metadata={"order": "17"})
    assert held.id.startswith("hold_") and len(held.id) == 25
    assert (held.account, held.amount, held.status, held.reason) == (
        account.id,
        300,
        HELD,
        "order 17",
    )
    assert held.expire_time.ToDatetime() - held.create_time.ToDatetime() == timedelta(minutes=15)
    assert (held.account_version, held.actor) == (account.version + 1, "anonymous")
    assert balances(accounts, account.id) == (1000, 300, 700)

    # A held point cannot be spent twice.
    found = fails(
        points.CreatePointsTransaction,
        points_pb2.CreatePointsTransactionRequest(account=account.id, type=REDEEM, amount=701),
        FAILED_PRECONDITION,
        "INSUFFICIENT_POINTS",
    )
    assert found.metadata == {
        "available": "700", "held": "300", "balance": "1000", "requested": "701",
    }  # fmt: skip
    found = fails(points.CreateHold, hold_request(account.id, 701), FAILED_PRECONDITION,
                  "INSUFFICIENT_POINTS")  # fmt: skip
    assert found.metadata == {
        "available": "700", "held": "300", "balance": "1000", "requested": "701",
    }  # fmt: skip

    captured = capture(points, held.id, 120, request_id="cap-1")
    assert (captured.status, captured.captured_amount) == (CAPTURED, 120)
    assert captured.capture_time.ToDatetime() >= held.create_time.ToDatetime()
    redeem = points.GetPointsTransaction(
        points_pb2.GetPointsTransactionRequest(id=captured.capture_transaction)
    )
    assert (redeem.type, redeem.amount, redeem.points_after) == (REDEEM, 120, 880)
    assert (redeem.origin.kind, redeem.origin.id) == (points_pb2.Origin.KIND_REDEMPTION, held.id)
    assert (redeem.reason, dict(redeem.metadata)) == ("order 17", {"order": "17"})
    # The rest is released with the capture: nothing stays held.
    assert balances(accounts, account.id) == (880, 0, 880)
    assert get(accounts, account.id).version == held.account_version + 1 == captured.account_version

    # A captured REDEEM is reversed like any other.
    reverse(points, captured.capture_transaction, amount=20)
    assert balances(accounts, account.id) == (900, 0, 900)
    assert points.GetHold(points_pb2.GetHoldRequest(id=held.id)) == captured
    checks_clean(database_url)


def test_capture_and_release_happen_once(accounts, points, database_url):
    account = funded_account(accounts, points, 500)
    held = hold(points, account.id, 200)
    first = capture(points, held.id, request_id="cap-a")
    assert (first.status, first.captured_amount) == (CAPTURED, 200)
    # The same request again: the first response.
    assert capture(points, held.id, request_id="cap-a") == first
    # Another capture, or a release: the hold is no longer active.
    for call in (
        lambda: capture(points, held.id, request_id="cap-b"),
        lambda: capture(points, held.id),
        lambda: release(points, held.id),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        found = failed_with(caught.value, FAILED_PRECONDITION, "HOLD_NOT_ACTIVE")
        assert found.metadata == {"hold": held.id, "status": "CAPTURED"}
    # The request id of the first capture with other fields.
    fails(
        points.CaptureHold,
        points_pb2.CaptureHoldRequest(id=held.id, amount=1, request_id="cap-a"),
        INVALID,
        "REQUEST_ID_REUSED",
    )

    released = release(points, (other := hold(points, account.id, 100)).id, request_id="rel-a")
    assert (released.status, released.released_by, released.captured_amount) == (
        RELEASED, "anonymous", 0,
    )  # fmt: skip
    assert released.release_time.ToDatetime() >= other.create_time.ToDatetime()
    assert release(points, other.id, request_id="rel-a") == released
    found = fails(points.CaptureHold, points_pb2.CaptureHoldRequest(id=other.id),
                  FAILED_PRECONDITION, "HOLD_NOT_ACTIVE")  # fmt: skip
    assert found.metadata["status"] == "RELEASED"
    assert balances(accounts, account.id) == (300, 0, 300)
    checks_clean(database_url)


def test_a_reference_is_the_hold_s_key_for_good(accounts, points, database_url):
    account = funded_account(accounts, points, 1000)
    request = hold_request(account.id, 50, reason="cart", metadata={"k": "v"})
    first = points.CreateHold(request)
    assert points.CreateHold(request) == first
    for changed in (
        {"amount": 51},
        {"reason": "other"},
        {"metadata": {"k": "w"}},
        {"ttl": duration_pb2.Duration(seconds=60)},
        {"account": funded_account(accounts, points, 100).id},
    ):
        other = points_pb2.CreateHoldRequest()
        other.CopyFrom(request)
        for name, value in changed.items():
            if name == "metadata":
                other.metadata.clear()
                other.metadata.update(value)
            elif name == "ttl":
                other.ttl.CopyFrom(value)
            else:
                setattr(other, name, value)
        found = fails(points.CreateHold, other, INVALID, "HOLD_REFERENCE_REUSED")
        assert found.metadata == {"reference": request.reference, "hold": first.id}
    # Kept after the hold ends: a retry of a captured hold is answered with it, as it is now.
    captured = capture(points, first.id)
    assert points.CreateHold(request) == captured
    # Racing first attempts make one hold.
    racing = hold_request(account.id, 10)
    results, errors = at_once(points.CreateHold, racing, 20)
    assert errors == [] and len({r.id for r in results}) == 1
    assert balances(accounts, account.id) == (950, 10, 940)
    checks_clean(database_url)


def test_60_concurrent_holds_of_25_on_1000(accounts, points, database_url):
    account = funded_account(accounts, points, 1000)
    futures = [points.CreateHold.future(hold_request(account.id, 25)) for _ in range(60)]
    results, errors = settle(futures)
    assert (len(results), len(errors)) == (40, 20)
    for error in errors:
        found = failed_with(error, FAILED_PRECONDITION, "INSUFFICIENT_POINTS")
        assert (found.metadata["available"], found.metadata["requested"]) == ("0", "25")
    assert balances(accounts, account.id) == (1000, 1000, 0)
    # Each success took its own version of the account.
    assert sorted(r.account_version for r in results) == list(
        range(account.version + 1, account.version + 41)
    )
    checks_clean(database_url)


def test_holds_racing_redeems_never_overspend(accounts, points, database_url):
    account = funded_account(accounts, points, 600)
    redeem = points_pb2.CreatePointsTransactionRequest(account=account.id, type=REDEEM, amount=20)
    futures = []
    for _ in range(30):
        futures.append(points.CreateHold.future(hold_request(account.id, 20)))
        futures.append(points.CreatePointsTransaction.future(redeem))
    results, errors = settle(futures)
    # 600 points pay for exactly 30 of the 60 debits of 20, holds and redeems alike.
    assert (len(results), len(errors)) == (30, 30)
    for error in errors:
        failed_with(error, FAILED_PRECONDITION, "INSUFFICIENT_POINTS")
    held = sum(1 for r in results if isinstance(r, points_pb2.Hold))
    assert balances(accounts, account.id) == (600 - 20 * (30 - held), 20 * held, 0)
    checks_clean(database_url)


def test_capture_racing_release_one_wins(accounts, points, database_url):
    account = funded_account(accounts, points, 10 * 40)
    outcomes = []
    for _ in range(10):
        held = hold(points, account.id, 40)
        calls = [
            points.CaptureHold.future(points_pb2.CaptureHoldRequest(id=held.id)),
            points.ReleaseHold.future(points_pb2.ReleaseHoldRequest(id=held.id)),
        ]
        results, errors = settle(calls)
        assert (len(results), len(errors)) == (1, 1)
        found = failed_with(errors[0], FAILED_PRECONDITION, "HOLD_NOT_ACTIVE")
        assert found.metadata["status"] == Hold.Status.Name(results[0].status)[len("STATUS_") :]
        outcomes.append(results[0].status)
    captured = outcomes.count(CAPTURED)
    assert captured + outcomes.count(RELEASED) == 10
    assert balances(accounts, account.id) == (400 - 40 * captured, 0, 400 - 40 * captured)
    checks_clean(database_url)


def test_a_merge_racing_a_capture_on_the_source(accounts, points, database_url):
    for _ in range(5):
        source = funded_account(accounts, points, 100)
        target = funded_account(accounts, points, 50)
        held = hold(points, source.id, 70)
        merge = accounts.MergeAccounts.future(
            accounts_pb2.MergeAccountsRequest(source=source.id, target=target.id)
        )
        captured = points.CaptureHold.future(points_pb2.CaptureHoldRequest(id=held.id, amount=60))
        (merged, done), errors = settle([merge, captured])
        assert errors == []
        assert (done.status, done.captured_amount) == (CAPTURED, 60)
        # Nothing lost either way: the capture landed where the points were.
        assert balances(accounts, target.id) == (90, 0, 90)
        assert balances(accounts, source.id) == (0, 0, 0)
        assert merged.target.id == target.id
    checks_clean(database_url)


def test_a_merge_moves_held_holds_and_close_refuses_them(accounts, points, database_url):
    source = funded_account(accounts, points, 100)
    target = funded_account(accounts, points, 50)
    held = hold(points, source.id, 80)
    merged = accounts.MergeAccounts(
        accounts_pb2.MergeAccountsRequest(source=source.id, target=target.id)
    )
    assert (merged.target.held_points, merged.target.available_balance) == (80, 70)
    assert (merged.source.held_points, merged.source.balance) == (0, 0)
    moved = points.GetHold(points_pb2.GetHoldRequest(id=held.id))
    assert (moved.account, moved.original_account, moved.status) == (target.id, source.id, HELD)
    listed = points.ListHolds(points_pb2.ListHoldsRequest(account=target.id)).holds
    assert [h.id for h in listed] == [held.id]
    found = fails(
        accounts.CloseAccount,
        accounts_pb2.CloseAccountRequest(id=target.id),
        FAILED_PRECONDITION,
        "ACCOUNT_HAS_ACTIVE_HOLDS",
    )
    assert found.metadata == {"account": target.id, "held": "80"}
    # The checkout in flight still captures, on the target.
    done = capture(points, held.id, 30)
    assert balances(accounts, target.id) == (120, 0, 120)
    redeem = points.GetPointsTransaction(
        points_pb2.GetPointsTransactionRequest(id=done.capture_transaction)
    )
    assert redeem.account == target.id
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=target.id))
    checks_clean(database_url)


def test_hold_events_through_the_event_log(accounts, points, channel, database_url):
    account = funded_account(accounts, points, 100)
    first = hold(points, account.id, 30)
    captured = capture(points, first.id, 10)
    second = hold(points, account.id, 5)
    released = release(points, second.id)
    events = events_pb2_grpc.LoyaltyEventsStub(channel).ListEvents(
        events_pb2.ListEventsRequest(account=account.id, page_size=100)
    )
    kinds = [
        (e.hold_event.type, e.hold_event.snapshot.status, e.hold_event.snapshot.account_version)
        if e.WhichOneof("event") == "hold_event"
        else (e.transaction_event.type, e.transaction_event.snapshot.amount, 0)
        if e.WhichOneof("event") == "transaction_event"
        else (e.account_event.type, 0, 0)
        for e in events.events
    ]
    assert kinds == [
        ("loyalty.account.created", 0, 0),
        ("points_transaction.created", 100, 0),
        ("points_hold.created", HELD, first.account_version),
        ("points_transaction.created", 10, 0),
        ("points_hold.captured", CAPTURED, captured.account_version),
        ("points_hold.created", HELD, second.account_version),
        ("points_hold.released", RELEASED, released.account_version),
    ]
    checks_clean(database_url)


def test_subscribers_get_hold_events(accounts, points):
    account = funded_account(accounts, points, 100)
    stream = points.SubscribeHoldEvents(points_pb2.SubscribeHoldEventsRequest(account=account.id))
    start = next(stream)
    assert list(start.events) == []
    held = hold(points, account.id, 40)
    release(points, held.id)
    seen = []
    for response in stream:
        seen += [(e.type, e.snapshot.id) for e in response.events]
        if len(seen) >= 2:
            break
    stream.cancel()
    assert seen == [("points_hold.created", held.id), ("points_hold.released", held.id)]


def test_an_expired_hold_frees_its_points_at_once(accounts, points, database_url):
    account = funded_account(accounts, points, 100)
    held = hold(points, account.id, 60, ttl=duration_pb2.Duration(seconds=1))
    assert held.expire_time.ToDatetime() - held.create_time.ToDatetime() == timedelta(seconds=1)
    time.sleep(1.1)
    # Whatever the job has done by now: EXPIRED, and the points available.
    assert points.GetHold(points_pb2.GetHoldRequest(id=held.id)).status == EXPIRED
    assert balances(accounts, account.id) == (100, 0, 100)
    found = fails(points.CaptureHold, points_pb2.CaptureHoldRequest(id=held.id),
                  FAILED_PRECONDITION, "HOLD_NOT_ACTIVE")  # fmt: skip
    assert found.metadata["status"] == "EXPIRED"
    post(points, account.id, REDEEM, 100)
    # The job (one pass a second) has recorded it by now, with its event, once.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            checks_clean(database_url, expiry_grace=timedelta(0))
            break
        except AssertionError:
            time.sleep(0.2)
    checks_clean(database_url, expiry_grace=timedelta(0))
    assert balances(accounts, account.id) == (0, 0, 0)


def _ttl(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


@pytest.mark.parametrize(
    ("fields", "violations"),
    [
        ({"amount": 0}, {"amount": "must be between 1 and 1000000000"}),
        ({"amount": -5}, {"amount": "must be between 1 and 1000000000"}),
        ({"amount": 2**63 - 1}, {"amount": "must be between 1 and 1000000000"}),
        ({"reference": ""}, {"reference": "is required"}),
        ({"reference": "r" * 256}, {"reference": "is longer than 255 characters"}),
        ({"ttl": _ttl(0)}, {"ttl": "must be whole seconds, from 1 to 31622400"}),
        ({"ttl": _ttl(-1)}, {"ttl": "must be whole seconds, from 1 to 31622400"}),
        ({"ttl": _ttl(1, 500)}, {"ttl": "must be whole seconds, from 1 to 31622400"}),
        ({"ttl": _ttl(315_576_000_000)}, {"ttl": "must be whole seconds, from 1 to 31622400"}),
        (
            {"ttl": _ttl(7 * 24 * 3600 + 1)},
            {"ttl": "must be at most the program's max_ttl, 604800 s"},
        ),
        ({"account": "loy_x"}, {"account": "is not a valid id (expected ^loy_[A-Za-z0-9]{20}$)"}),
    ],
)
def test_bad_hold_requests(accounts, points, fields, violations):
    account = funded_account(accounts, points, 10)
    request = hold_request(account.id, 5)
    for name, value in fields.items():
        if name == "ttl":
            request.ttl.CopyFrom(value)
        else:
            setattr(request, name, value)
    found = fails(points.CreateHold, request, INVALID, "INVALID_ARGUMENT")
    assert found.field_violations == violations
    assert balances(accounts, account.id) == (10, 0, 10)


def test_holds_that_do_not_exist_or_cannot_be(accounts, points, programs):
    missing = "hold_" + "N" * 20
    for call, request in (
        (points.GetHold, points_pb2.GetHoldRequest(id=missing)),
        (points.CaptureHold, points_pb2.CaptureHoldRequest(id=missing)),
        (points.ReleaseHold, points_pb2.ReleaseHoldRequest(id=missing)),
    ):
        found = fails(call, request, NOT_FOUND, "HOLD_NOT_FOUND")
        assert found.metadata == {"hold": missing}
    for call, request in (
        (points.GetHold, points_pb2.GetHoldRequest(id="ptx_" + "N" * 20)),
        (points.CaptureHold, points_pb2.CaptureHoldRequest(id="hold_1", amount=0)),
    ):
        fails(call, request, INVALID, "INVALID_ARGUMENT")
    found = fails(points.CreateHold, hold_request("loy_" + "N" * 20, 5), NOT_FOUND,
                  "ACCOUNT_NOT_FOUND")  # fmt: skip
    account = funded_account(accounts, points, 100)
    held = hold(points, account.id, 50)
    found = fails(
        points.CaptureHold,
        points_pb2.CaptureHoldRequest(id=held.id, amount=51),
        FAILED_PRECONDITION,
        "CAPTURE_EXCEEDS_HOLD",
    )
    assert found.metadata == {"hold": held.id, "held": "50", "requested": "51"}
    accounts.CloseAccount(
        accounts_pb2.CloseAccountRequest(id=(closed := create_account(accounts)).id)
    )
    fails(points.CreateHold, hold_request(closed.id, 1), FAILED_PRECONDITION, "ACCOUNT_NOT_ACTIVE")
    # Hold ids are reserved for captures' redemptions.
    found = fails(
        points.CreatePointsTransaction,
        points_pb2.CreatePointsTransactionRequest(
            account=account.id, type=REDEEM, amount=1,
            origin=points_pb2.Origin(kind=points_pb2.Origin.KIND_REDEMPTION, id=held.id),
        ),
        INVALID,
        "INVALID_ARGUMENT",
    )  # fmt: skip
    assert found.field_violations == {
        "origin.id": "hold ids are reserved for CaptureHold's redemptions"
    }
    assert balances(accounts, account.id) == (100, 50, 50)


def test_a_program_s_hold_policy(accounts, points, programs):
    Policy = programs_pb2.HoldPolicy
    program = programs.CreateProgram(
        programs_pb2.CreateProgramRequest(
            program=programs_pb2.Program(
                name="Short holds", currency="EUR", hold_policy=Policy(max_ttl=_ttl(3600))
            )
        )
    )
    assert program.hold_policy == Policy(default_ttl=_ttl(900), max_ttl=_ttl(3600))
    account = create_account(accounts, program=program.id)
    post(points, account.id, points_pb2.PointsTransaction.TYPE_EARN, 10)
    fails(points.CreateHold, hold_request(account.id, 1, ttl=_ttl(3601)), INVALID,
          "INVALID_ARGUMENT")  # fmt: skip
    assert hold(points, account.id, 1, ttl=_ttl(3600)).amount == 1
    updated = programs.UpdateProgram(
        programs_pb2.UpdateProgramRequest(
            program=programs_pb2.Program(
                id=program.id, hold_policy=Policy(default_ttl=_ttl(60), max_ttl=_ttl(120))
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["hold_policy"]),
        )
    )
    assert updated.hold_policy == Policy(default_ttl=_ttl(60), max_ttl=_ttl(120))
    defaulted = hold(points, account.id, 1)
    assert defaulted.expire_time.ToDatetime() - defaulted.create_time.ToDatetime() == timedelta(
        seconds=60
    )
    found = fails(
        programs.UpdateProgram,
        programs_pb2.UpdateProgramRequest(
            program=programs_pb2.Program(
                id=program.id, hold_policy=Policy(default_ttl=_ttl(600), max_ttl=_ttl(120))
            )
        ),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert found.field_violations == {"program.hold_policy.default_ttl": "must not exceed max_ttl"}
    found = fails(
        programs.CreateProgram,
        programs_pb2.CreateProgramRequest(
            program=programs_pb2.Program(
                name="Bad", currency="EUR", hold_policy=Policy(max_ttl=_ttl(0, 1))
            )
        ),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert found.field_violations == {
        "program.hold_policy.max_ttl": "must be whole seconds, from 1 to 31622400"
    }


def test_many_clients_on_many_holds(accounts, points, database_url):
    """Creates, captures and releases from 16 threads at once on 4 accounts; every point is
    where the ledger says."""
    funded = [funded_account(accounts, points, 1000) for _ in range(4)]

    def checkout(index: int) -> int:
        account = funded[index % 4].id
        try:
            held = hold(points, account, 7)
        except grpc.RpcError as error:
            failed_with(error, FAILED_PRECONDITION, "INSUFFICIENT_POINTS")
            return 0
        if index % 3 == 0:
            release(points, held.id)
            return 0
        return capture(points, held.id, 5).captured_amount

    with ThreadPoolExecutor(16) as pool:
        spent = list(pool.map(checkout, range(200)))
    assert sum(balances(accounts, a.id)[0] for a in funded) == 4000 - sum(spent)
    assert all(balances(accounts, a.id)[1] == 0 for a in funded)
    checks_clean(database_url)
