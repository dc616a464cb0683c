"""The rules of holds that need no database: time-to-live bounds, hold policies, the
capture's REDEEM, available points and the error for each refusal."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty_service import domain
from loyalty_service.domain.holds import Hold, HoldStatus, NewHold
from loyalty_service.domain.programs import HoldPolicy
from tests.domain.builders import ACCOUNT_ID, NOW, PROPERTY, account

CEILING = domain.programs.HOLD_TTL_CEILING_SECONDS
TTL_MESSAGE = f"must be whole seconds, from 1 to {CEILING}"
HOLD_ID = "hold_" + "a" * 20


def hold(**changes: object) -> Hold:
    base = Hold(
        id=HOLD_ID,
        account=ACCOUNT_ID,
        original_account=None,
        program="prog_default",
        reference="auth-1",
        amount=50,
        captured_amount=0,
        status=HoldStatus.HELD,
        reason="",
        metadata={},
        create_time=NOW,
        expire_time=NOW + timedelta(minutes=15),
        capture_time=None,
        release_time=None,
        capture_transaction=None,
        account_version=2,
        actor="anonymous",
        captured_by=None,
        released_by=None,
    )
    return Hold(**{**vars(base), **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "nanos", "valid"),
    [
        (1, 0, True),
        (900, 0, True),
        (CEILING, 0, True),
        (0, 0, False),
        (-1, 0, False),
        (CEILING + 1, 0, False),
        (60, 1, False),
        (2**63 - 1, 0, False),
    ],
)
def test_ttl_bounds(seconds, nanos, valid):
    found = domain.programs.ttl_violations("ttl", seconds, nanos)
    assert found == ([] if valid else [domain.errors.FieldViolation("ttl", TTL_MESSAGE)])


@pytest.mark.parametrize(
    ("policy", "violations"),
    [
        (HoldPolicy(), []),
        (HoldPolicy(900, 900), []),
        (HoldPolicy(901, 900), [("p.default_ttl", "must not exceed max_ttl")]),
        # Out of bounds: said by ttl_violations, not again here.
        (HoldPolicy(900, 0), []),
    ],
)
def test_a_hold_policy_s_default_is_within_its_maximum(policy, violations):
    found = domain.programs.hold_policy_violations("p", policy)
    assert [(v.field, v.description) for v in found] == violations


def test_hold_policy_defaults():
    assert HoldPolicy() == HoldPolicy(15 * 60, 7 * 24 * 3600)


def test_a_capture_posts_a_redeem_of_its_hold():
    ptx, change = domain.holds.capture_posting(HOLD_ID, NOW, "checkout")
    assert (ptx.type, ptx.direction, ptx.origin_kind, ptx.origin_id, ptx.create_time) == (
        domain.points.TransactionType.REDEEM,
        domain.points.Direction.DEBIT,
        domain.points.OriginKind.REDEMPTION,
        HOLD_ID,
        NOW,
    )
    assert ptx.actor == "checkout"
    assert ptx.id.startswith("ptx_") and domain.ids.TRANSACTION_ID.fullmatch(ptx.id)
    # The overdraft floor of any REDEEM: the kernel checks the available balance against it.
    assert change == domain.points.Change(delta=0, lifetime_delta=0, min_balance=0)


@PROPERTY
@given(balance=st.integers(-(10**15), 10**15), held=st.integers(0, 10**15))
def test_available_is_balance_less_held(balance, held):
    held_account = account(balance=balance, held_points=held)
    assert held_account.available_balance == balance - held
    refused = domain.accounts.insufficient_points(held_account, 7)
    assert refused.metadata == {
        "available": str(balance - held),
        "held": str(held),
        "balance": str(balance),
        "requested": "7",
    }


NEW = NewHold(ACCOUNT_ID, 70, "auth-1", "", {}, None)


@pytest.mark.parametrize(
    ("reason", "found_account", "max_ttl", "error", "metadata"),
    [
        ("ACCOUNT_NOT_FOUND", None, None, domain.errors.AccountNotFound, {"account": ACCOUNT_ID}),
        (
            "ACCOUNT_NOT_ACTIVE",
            account(status=domain.accounts.AccountStatus.CLOSED),
            None,
            domain.errors.AccountNotActive,
            {"account": ACCOUNT_ID, "status": "CLOSED"},
        ),
        (
            "INSUFFICIENT_POINTS",
            account(held_points=40),
            None,
            domain.errors.InsufficientPoints,
            {"available": "60", "held": "40", "balance": "100", "requested": "70"},
        ),
        ("TTL_EXCEEDS_MAXIMUM", None, 3600, domain.errors.InvalidArgument, {"fields": "ttl"}),
    ],
)
def test_creation_refusals(reason, found_account, max_ttl, error, metadata):
    refused = domain.holds.creation_refusal(reason, NEW, found_account, max_ttl)
    assert type(refused) is error
    assert refused.metadata == metadata


@pytest.mark.parametrize(
    ("reason", "found_hold", "requested", "error", "metadata"),
    [
        ("HOLD_NOT_FOUND", None, None, domain.errors.HoldNotFound, {"hold": HOLD_ID}),
        (
            "HOLD_NOT_ACTIVE",
            hold(status=HoldStatus.EXPIRED),
            None,
            domain.errors.HoldNotActive,
            {"hold": HOLD_ID, "status": "EXPIRED"},
        ),
        (
            "CAPTURE_EXCEEDS_HOLD",
            hold(),
            51,
            domain.errors.CaptureExceedsHold,
            {"hold": HOLD_ID, "held": "50", "requested": "51"},
        ),
        (
            "INSUFFICIENT_POINTS",
            hold(),
            None,
            domain.errors.InsufficientPoints,
            {"available": "100", "held": "0", "balance": "100", "requested": "50"},
        ),
    ],
)
def test_capture_and_release_refusals(reason, found_hold, requested, error, metadata):
    refused = domain.holds.finish_refusal(reason, HOLD_ID, found_hold, account(), requested)
    assert type(refused) is error
    assert refused.metadata == metadata


def test_an_unknown_refusal_is_a_bug_not_an_answer():
    with pytest.raises(AssertionError):
        domain.holds.finish_refusal("SOMETHING_ELSE", HOLD_ID, hold(), account(), None)
    with pytest.raises(AssertionError):
        domain.holds.creation_refusal("SOMETHING_ELSE", NEW, account(), None)
