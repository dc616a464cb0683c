"""PointsLedger through the real server: postings, balances, reversals, listing."""

from __future__ import annotations

from loyalty_service.pb import accounts_pb2, points_pb2
from tests.support import (
    ADJUST,
    CREDIT,
    DEBIT,
    EARN,
    EXPIRE,
    FAILED_PRECONDITION,
    NOT_FOUND,
    REDEEM,
    REVERSE,
    Failure,
    create_account,
    fails,
    funded_account,
    get,
    post,
    reverse,
)

Origin = points_pb2.Origin


def reversal_fails(points, transaction_id: str, reason: str, **fields) -> Failure:
    return fails(
        points.ReversePointsTransaction,
        points_pb2.ReversePointsTransactionRequest(id=transaction_id, **fields),
        FAILED_PRECONDITION,
        reason,
    )


def test_earn_and_redeem_move_balance_and_lifetime(accounts, points):
    account = create_account(accounts)
    earned = post(
        points,
        account.id,
        EARN,
        200,
        reason="Purchase earn",
        origin=Origin(kind=Origin.KIND_PAYMENT, id="pay_123"),
        metadata={"order": "o-1"},
    )
    assert earned.id.startswith("ptx_") and len(earned.id) == 24
    assert (earned.account, earned.type, earned.direction) == (account.id, EARN, CREDIT)
    assert (earned.amount, earned.points_after, earned.reason) == (200, 200, "Purchase earn")
    assert (earned.origin.kind, earned.origin.id) == (Origin.KIND_PAYMENT, "pay_123")
    assert dict(earned.metadata) == {"order": "o-1"}
    assert (earned.reverses, earned.original_account) == ("", "")

    redeemed = post(points, account.id, REDEEM, 150)
    assert (redeemed.direction, redeemed.points_after) == (DEBIT, 50)
    assert redeemed.origin.kind == Origin.KIND_MANUAL
    after = get(accounts, account.id)
    assert (after.balance, after.lifetime_points) == (50, 200)
    assert (
        points.GetPointsTransaction(points_pb2.GetPointsTransactionRequest(id=earned.id)) == earned
    )


def test_adjust_and_expire(accounts, points):
    account = create_account(accounts)
    assert post(points, account.id, ADJUST, 500, direction=CREDIT).points_after == 500
    assert post(points, account.id, ADJUST, 120, direction=DEBIT).points_after == 380
    expired = post(points, account.id, EXPIRE, 80)
    assert (expired.direction, expired.points_after) == (DEBIT, 300)
    after = get(accounts, account.id)
    assert (after.balance, after.lifetime_points) == (300, 500)


def test_debits_never_go_below_zero(accounts, points):
    account = funded_account(accounts, points, 100)
    for type_, direction in ((REDEEM, 0), (ADJUST, DEBIT), (EXPIRE, 0)):
        found = fails(
            points.CreatePointsTransaction,
            points_pb2.CreatePointsTransactionRequest(
                account=account.id, type=type_, direction=direction, amount=101
            ),
            FAILED_PRECONDITION,
            "INSUFFICIENT_POINTS",
        )
        assert found.metadata == {
            "available": "100",
            "held": "0",
            "balance": "100",
            "requested": "101",
        }
    assert post(points, account.id, REDEEM, 100).points_after == 0
    assert get(accounts, account.id).balance == 0


def test_full_and_partial_reversals(accounts, points):
    account = create_account(accounts)
    earned = post(points, account.id, EARN, 100)
    partial = reverse(points, earned.id, amount=30, reason="refund")
    assert (partial.type, partial.direction, partial.amount) == (REVERSE, DEBIT, 30)
    assert (partial.reverses, partial.points_after, partial.reason) == (earned.id, 70, "refund")

    rest = reverse(points, earned.id)
    assert (rest.amount, rest.points_after) == (70, 0)

    found = reversal_fails(points, earned.id, "ALREADY_REVERSED", amount=1)
    assert (found.metadata["reversible"], found.metadata["requested"]) == ("0", "1")
    after = get(accounts, account.id)
    assert (after.balance, after.lifetime_points) == (0, 100), "lifetime never decreases"


def test_reversal_beyond_remaining_amount(accounts, points):
    account = create_account(accounts)
    earned = post(points, account.id, EARN, 50)
    reverse(points, earned.id, amount=40)
    found = reversal_fails(points, earned.id, "ALREADY_REVERSED", amount=11)
    assert (found.metadata["reversible"], found.metadata["requested"]) == ("10", "11")
    assert get(accounts, account.id).balance == 10


def test_reversing_a_redeem_restores_balance_only(accounts, points):
    account = funded_account(accounts, points, 100)
    redeemed = post(points, account.id, REDEEM, 60)
    reversal = reverse(points, redeemed.id)
    assert (reversal.direction, reversal.amount, reversal.points_after) == (CREDIT, 60, 100)
    after = get(accounts, account.id)
    assert (after.balance, after.lifetime_points) == (100, 100)


def test_reversal_of_spent_points_may_leave_a_negative_balance(accounts, points):
    account = create_account(accounts)
    earned = post(points, account.id, EARN, 100)
    post(points, account.id, REDEEM, 80)
    reversal = reverse(points, earned.id)
    assert (reversal.amount, reversal.points_after) == (100, -80)
    assert get(accounts, account.id).balance == -80
    # A negative balance blocks further debits until it is earned back.
    fails(
        points.CreatePointsTransaction,
        points_pb2.CreatePointsTransactionRequest(account=account.id, type=REDEEM, amount=1),
        FAILED_PRECONDITION,
        "INSUFFICIENT_POINTS",
    )


def test_a_reversal_cannot_be_reversed(accounts, points):
    account = create_account(accounts)
    earned = post(points, account.id, EARN, 10)
    reversal = reverse(points, earned.id)
    reversal_fails(points, reversal.id, "NOT_REVERSIBLE")


def test_reversal_on_a_closed_account(accounts, points):
    account = create_account(accounts)
    earned = post(points, account.id, EARN, 10)
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=account.id))
    reversal_fails(points, earned.id, "ACCOUNT_NOT_ACTIVE")


def test_reversal_after_merge_lands_on_the_survivor(accounts, points):
    source = create_account(accounts)
    earned = post(points, source.id, EARN, 40)
    target = funded_account(accounts, points, 10)
    accounts.MergeAccounts(accounts_pb2.MergeAccountsRequest(source=source.id, target=target.id))
    reversal = reverse(points, earned.id, amount=15)
    assert (reversal.account, reversal.points_after) == (target.id, 35)
    moved = points.GetPointsTransaction(points_pb2.GetPointsTransactionRequest(id=earned.id))
    assert (moved.account, moved.original_account, moved.points_after) == (
        target.id,
        source.id,
        40,
    )


def test_unknown_transaction_is_not_found(points):
    # GetPointsTransaction: tests/api/test_accounts.py::test_an_unknown_id_is_not_found.
    fails(
        points.ReversePointsTransaction,
        points_pb2.ReversePointsTransactionRequest(id="ptx_" + "Q" * 20),
        NOT_FOUND,
        "POINTS_TRANSACTION_NOT_FOUND",
    )
    fails(
        points.CreatePointsTransaction,
        points_pb2.CreatePointsTransactionRequest(account="loy_" + "Q" * 20, type=EARN, amount=1),
        NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )


def test_list_filters_newest_first_and_pages_while_rows_arrive(accounts, points):
    account = create_account(accounts)
    posted = [post(points, account.id, EARN, n) for n in range(1, 6)]
    posted.append(post(points, account.id, REDEEM, 3))
    newest_first = [t.id for t in reversed(posted)]

    first = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(account=account.id, page_size=4)
    )
    assert [t.id for t in first.points_transactions] == newest_first[:4]
    post(points, account.id, EARN, 99)  # arrives between pages; belongs before page one
    second = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(
            account=account.id, page_size=4, page_token=first.next_page_token
        )
    )
    assert [t.id for t in second.points_transactions] == newest_first[4:]
    assert second.next_page_token == ""

    debits = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(account=account.id, direction=DEBIT)
    )
    assert [t.id for t in debits.points_transactions] == [posted[-1].id]
    redeems = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(account=account.id, type=REDEEM)
    )
    assert [t.id for t in redeems.points_transactions] == [posted[-1].id]


def test_page_size_is_capped_at_100(accounts, points):
    account = create_account(accounts)
    futures = [
        points.CreatePointsTransaction.future(
            points_pb2.CreatePointsTransactionRequest(account=account.id, type=EARN, amount=1)
        )
        for _ in range(105)
    ]
    for future in futures:
        future.result()
    page = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(account=account.id, page_size=1000)
    )
    assert len(page.points_transactions) == 100
    rest = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(
            account=account.id, page_size=1000, page_token=page.next_page_token
        )
    )
    assert len(rest.points_transactions) == 5 and rest.next_page_token == ""


def test_a_page_of_large_transactions_is_cut_to_fit_one_message(accounts, points):
    """100 transactions with the most metadata would be ~10 MB: past gRPC's 4 MB limit."""
    account = create_account(accounts)
    metadata = {f"key{i:02}": "é" * 500 for i in range(50)}
    posted = [post(points, account.id, EARN, 1, metadata=metadata).id for _ in range(40)]
    seen, token, pages = [], "", 0
    while True:
        page = points.ListPointsTransactions(
            points_pb2.ListPointsTransactionsRequest(
                account=account.id, page_size=100, page_token=token
            )
        )
        assert page.ByteSize() < 1_200_000
        seen += [t.id for t in page.points_transactions]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == posted[::-1] and pages > 1
