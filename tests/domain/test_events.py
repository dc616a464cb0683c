"""Events: which events a filter takes, the positions a stream or list may start after, and
the events of account and transaction changes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loyalty_service import domain
from tests.domain.builders import (
    ACCOUNT,
    ACCOUNT_ID,
    NOW,
    OTHER_ACCOUNT_ID,
    PROGRAM_ID,
    PROPERTY,
    account,
    transaction,
)

CLOSED_EVENT = domain.events.EventType.ACCOUNT_CLOSED
CLOSED_ONLY = frozenset({CLOSED_EVENT})


def event(
    type_: domain.events.EventType = CLOSED_EVENT,
    program: str = "prog_a",
    account_id: str = "loy_a",
) -> domain.events.Event:
    return domain.events.Event("evt_x", type_, NOW, program, account_id, ACCOUNT)


def test_event_types():
    assert {t.value for t in domain.events.ACCOUNT_EVENT_TYPES} == {
        "loyalty.account.created",
        "loyalty.account.updated",
        "loyalty.account.closed",
        "loyalty.account.reopened",
        "loyalty.account.merged",
        "loyalty.account.tier_changed",
    }
    assert {t.value for t in domain.events.TRANSACTION_EVENT_TYPES} == {
        "points_transaction.created"
    }
    assert {t.value for t in domain.events.HOLD_EVENT_TYPES} == {
        "points_hold.created",
        "points_hold.captured",
        "points_hold.released",
        "points_hold.expired",
    }
    assert (
        set(domain.events.EventType)
        == domain.events.ACCOUNT_EVENT_TYPES
        | domain.events.TRANSACTION_EVENT_TYPES
        | domain.events.HOLD_EVENT_TYPES
    )


def test_event_filters():
    closed = event()
    assert domain.events.EventFilter(CLOSED_ONLY).matches(closed)
    assert domain.events.EventFilter(CLOSED_ONLY, program="prog_a", account="loy_a").matches(closed)
    assert not domain.events.EventFilter(CLOSED_ONLY, program="prog_b").matches(closed)
    assert not domain.events.EventFilter(CLOSED_ONLY, account="loy_b").matches(closed)
    assert not domain.events.EventFilter(domain.events.TRANSACTION_EVENT_TYPES).matches(closed)


@pytest.mark.parametrize(
    ("types", "program", "account_id", "matches"),
    [
        # Each of the three must hold; None means any program or account.
        (types, program, account_id, type_ok and program_ok and account_ok)
        for (types, type_ok), (program, program_ok), (account_id, account_ok) in (
            itertools.product(
                [
                    (CLOSED_ONLY, True),
                    (domain.events.ACCOUNT_EVENT_TYPES, True),
                    (frozenset(domain.events.EventType), True),
                    (domain.events.TRANSACTION_EVENT_TYPES, False),
                    (frozenset({domain.events.EventType.ACCOUNT_REOPENED}), False),
                ],
                [(None, True), ("prog_a", True), ("prog_b", False)],
                [(None, True), ("loy_a", True), ("loy_b", False)],
            )
        )
    ],
)
def test_a_filter_takes_an_event_when_type_program_and_account_all_match(
    types, program, account_id, matches
):
    where = domain.events.EventFilter(types, program=program, account=account_id)
    assert where.matches(event()) is matches


@given(
    types=st.frozensets(st.sampled_from(list(domain.events.EventType)), min_size=1),
    program=st.sampled_from([None, "prog_a", "prog_b"]),
    account_id=st.sampled_from([None, "loy_a", "loy_b"]),
    type_=st.sampled_from(list(domain.events.EventType)),
)
@PROPERTY
def test_a_narrower_filter_takes_no_event_a_wider_one_refuses(types, program, account_id, type_):
    """Taking a field's constraint away (any type, any program, any account) never makes a
    filter refuse an event it took."""
    where = domain.events.EventFilter(types, program=program, account=account_id)
    every = frozenset(domain.events.EventType)
    wider = [
        domain.events.EventFilter(every, program=program, account=account_id),
        domain.events.EventFilter(types, program=None, account=account_id),
        domain.events.EventFilter(types, program=program, account=None),
    ]
    seen = event(type_)
    if where.matches(seen):
        assert all(w.matches(seen) for w in wider)


@pytest.mark.parametrize(
    ("after", "oldest", "newest"),
    [
        (4, 5, 9),  # just before the oldest
        (5, 5, 9),
        (9, 5, 9),  # the newest
        (9, 10, 9),  # nothing retained: from the newest on
        (0, 1, 0),  # an empty log
        (0, 1, 5),  # from the start
    ],
)
def test_a_stream_may_start_from_just_before_the_oldest_event_to_the_newest(after, oldest, newest):
    assert domain.events.check_position(after, oldest=oldest, newest=newest) is None


def refused_start(after: int, oldest: int, newest: int, error: type) -> domain.errors.OutOfRange:
    """What check_position raises for this start: an `error`, which is an OutOfRange."""
    with pytest.raises(error) as caught:
        domain.events.check_position(after, oldest=oldest, newest=newest)
    assert isinstance(caught.value, domain.errors.OutOfRange)
    return caught.value


@pytest.mark.parametrize(
    ("after", "oldest", "newest"),
    [(3, 5, 9), (0, 5, 9), (8, 10, 9), (0, 2, 5)],
)
def test_a_position_whose_next_events_were_pruned_has_expired(after, oldest, newest):
    expired = refused_start(after, oldest, newest, domain.errors.EventPositionExpired)
    assert expired.reason == "EVENT_POSITION_EXPIRED"
    assert expired.metadata == {"position": str(after), "oldestPosition": str(oldest)}
    assert expired.message == (
        f"events after position {after} are no longer retained; the oldest retained is {oldest}"
    )


@pytest.mark.parametrize(("after", "oldest", "newest"), [(10, 5, 9), (1, 1, 0), (10**12, 1, 5)])
def test_a_position_past_the_newest_event_is_ahead(after, oldest, newest):
    ahead = refused_start(after, oldest, newest, domain.errors.EventPositionAhead)
    assert ahead.reason == "EVENT_POSITION_AHEAD"
    assert ahead.metadata == {"position": str(after), "newestPosition": str(newest)}
    assert ahead.message == f"position {after} is past the newest event, {newest}"


def test_position_expired_is_the_error_to_raise():
    error = domain.events.position_expired(3, 5)
    assert isinstance(error, domain.errors.EventPositionExpired)
    assert error.metadata == {"position": "3", "oldestPosition": "5"}


@given(
    oldest=st.integers(1, 10**6), retained=st.integers(0, 10**6), after=st.integers(0, 3 * 10**6)
)
@PROPERTY
def test_every_start_position_is_accepted_or_refused_for_one_reason(oldest, retained, after):
    """With events oldest..newest retained (none when newest = oldest - 1), a start after
    oldest - 1 to newest is accepted; below that it has expired, above it is ahead."""
    newest = oldest - 1 + retained
    if after < oldest - 1:
        with pytest.raises(domain.errors.EventPositionExpired):
            domain.events.check_position(after, oldest, newest)
    elif after > newest:
        with pytest.raises(domain.errors.EventPositionAhead):
            domain.events.check_position(after, oldest, newest)
    else:
        domain.events.check_position(after, oldest, newest)


def test_an_account_event():
    closed = account(status=domain.accounts.AccountStatus.CLOSED, update_time=NOW.replace(hour=5))
    found = domain.events.account_event(domain.events.EventType.ACCOUNT_CLOSED, closed)
    assert found == domain.events.Event(
        id=found.id,
        type=domain.events.EventType.ACCOUNT_CLOSED,
        create_time=NOW.replace(hour=5),
        program=PROGRAM_ID,
        account=ACCOUNT_ID,
        snapshot=closed,
        position=0,  # until the event is written
    )
    assert found.id.startswith("evt_") and len(found.id) == 24
    assert (
        domain.events.account_event(domain.events.EventType.ACCOUNT_CLOSED, closed).id != found.id
    )


def test_a_transaction_event():
    posted = transaction(account=OTHER_ACCOUNT_ID, create_time=NOW.replace(hour=7))
    found = domain.events.transaction_event(posted, "prog_other")
    assert found == domain.events.Event(
        id=found.id,
        type=domain.events.EventType.TRANSACTION_CREATED,
        create_time=NOW.replace(hour=7),
        program="prog_other",
        account=OTHER_ACCOUNT_ID,
        snapshot=posted,
    )
    assert found.id.startswith("evt_") and len(found.id) == 24
    assert domain.events.EventFilter(
        domain.events.TRANSACTION_EVENT_TYPES, account=OTHER_ACCOUNT_ID
    ).matches(found)
