"""AIP-155 request ids: a retry returns the first response and has no second effect."""

from __future__ import annotations

from loyalty_service.pb import accounts_pb2, points_pb2
from tests.support import (
    EARN,
    FAILED_PRECONDITION,
    INVALID,
    MERGED,
    REDEEM,
    create_account,
    fails,
    funded_account,
    get,
    post,
    reverse,
    unique,
)

REUSED = (INVALID, "REQUEST_ID_REUSED")


def test_create_transaction_retry(accounts, points):
    account = funded_account(accounts, points, 100)
    request_id = unique("req")
    first = post(points, account.id, REDEEM, 40, request_id=request_id)
    post(points, account.id, REDEEM, 10)
    again = post(points, account.id, REDEEM, 40, request_id=request_id)

    assert again == first
    assert get(accounts, account.id).balance == 50
    found = fails(
        points.CreatePointsTransaction,
        points_pb2.CreatePointsTransactionRequest(
            account=account.id, type=REDEEM, amount=41, request_id=request_id
        ),
        *REUSED,
    )
    assert found.metadata == {"requestId": request_id}


def test_posting_retry_after_a_merge_and_a_reversal_returns_the_first_response(accounts, points):
    """The stored response of a posting is its ledger row, which a merge re-parents and a
    reversal counts against: the retry must still see the transaction as first posted."""
    source = funded_account(accounts, points, 10)
    target = funded_account(accounts, points, 5)
    request = points_pb2.CreatePointsTransactionRequest(
        account=source.id,
        type=EARN,
        amount=40,
        reason="Purchase earn",
        origin=points_pb2.Origin(kind=points_pb2.Origin.KIND_PAYMENT, id="pay_1"),
        metadata={"store": "12"},
        request_id=unique("req"),
    )
    first = points.CreatePointsTransaction(request)
    reverse(points, first.id, amount=15)
    accounts.MergeAccounts(accounts_pb2.MergeAccountsRequest(source=source.id, target=target.id))

    again = points.CreatePointsTransaction(request)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(
        deterministic=True
    )
    assert (again.account, again.original_account, again.points_after) == (source.id, "", 50)
    moved = points.GetPointsTransaction(points_pb2.GetPointsTransactionRequest(id=first.id))
    assert (moved.account, moved.original_account) == (target.id, source.id)
    assert get(accounts, target.id).balance == 5 + 50 - 15


def test_request_ids_are_scoped_per_method(accounts, points):
    request_id = unique("req")
    account = create_account(accounts, request_id=request_id)
    earned = post(points, account.id, EARN, 5, request_id=request_id)
    assert earned.points_after == 5


def test_create_account_retry_returns_the_first_account_not_already_exists(accounts):
    request = accounts_pb2.CreateAccountRequest(
        program="prog_default", customer=unique(), request_id=unique("req")
    )
    first = accounts.CreateAccount(request)
    assert accounts.CreateAccount(request) == first
    other = accounts_pb2.CreateAccountRequest(
        program="prog_default", customer=unique(), request_id=request.request_id
    )
    fails(accounts.CreateAccount, other, *REUSED)


def test_account_retries_return_the_first_snapshot(accounts, points):
    account = funded_account(accounts, points, 30)
    close = accounts_pb2.CloseAccountRequest(id=account.id, request_id=unique("req"))
    closed = accounts.CloseAccount(close)
    accounts.ReopenAccount(accounts_pb2.ReopenAccountRequest(id=account.id))
    # The retry replays the first response; it does not close the account again.
    assert accounts.CloseAccount(close) == closed
    assert get(accounts, account.id).status == accounts_pb2.Account.STATUS_ACTIVE


def test_merge_and_reverse_retries(accounts, points):
    source = funded_account(accounts, points, 20)
    target = funded_account(accounts, points, 5)
    merge = accounts_pb2.MergeAccountsRequest(
        source=source.id, target=target.id, request_id=unique("req")
    )
    merged = accounts.MergeAccounts(merge)
    assert accounts.MergeAccounts(merge) == merged
    assert merged.source.status == MERGED

    earned = post(points, target.id, EARN, 50)
    reversal = points_pb2.ReversePointsTransactionRequest(
        id=earned.id, amount=10, request_id=unique("req")
    )
    first = points.ReversePointsTransaction(reversal)
    assert points.ReversePointsTransaction(reversal) == first
    assert get(accounts, target.id).balance == 65


def test_a_failed_request_may_be_retried(accounts, points):
    account = create_account(accounts)
    request = points_pb2.CreatePointsTransactionRequest(
        account=account.id, type=REDEEM, amount=5, request_id=unique("req")
    )
    fails(
        points.CreatePointsTransaction,
        request,
        FAILED_PRECONDITION,
        "INSUFFICIENT_POINTS",
    )
    post(points, account.id, EARN, 5)
    assert points.CreatePointsTransaction(request).points_after == 0
