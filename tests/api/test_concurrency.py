"""Many concurrent clients against one ledger; exact totals and a clean invariant check after."""

from __future__ import annotations

import grpc

from loyalty_service.pb import accounts_pb2, points_pb2
from tests.support import (
    ACTIVE,
    ALREADY_EXISTS,
    EARN,
    FAILED_PRECONDITION,
    MERGED,
    REDEEM,
    account_request,
    create_account,
    failed_with,
    failure,
    funded_account,
    get,
    unique,
)


def settle(futures):
    """Waits for every call; returns (results, errors) in call order."""
    results, errors = [], []
    for future in futures:
        try:
            results.append(future.result(timeout=60))
        except grpc.RpcError as error:
            errors.append(error)
    return results, errors


def at_once(call, request, times: int):
    """Sends the same request `times` times without waiting; (results, errors) of settle."""
    return settle([call.future(request) for _ in range(times)])


def test_50_concurrent_redeems_of_30_against_1000(accounts, points, assert_invariants):
    account = funded_account(accounts, points, 1000)
    redeem = points_pb2.CreatePointsTransactionRequest(account=account.id, type=REDEEM, amount=30)
    results, errors = at_once(points.CreatePointsTransaction, redeem, 50)

    assert (len(results), len(errors)) == (33, 17)
    for error in errors:
        found = failed_with(error, FAILED_PRECONDITION, "INSUFFICIENT_POINTS")
        assert found.metadata["requested"] == "30"
        assert int(found.metadata["balance"]) < 30
    # Each success saw a distinct balance: 970, 940, ..., 10.
    assert sorted(r.points_after for r in results) == list(range(10, 1000, 30))
    assert get(accounts, account.id).balance == 10
    assert get(accounts, account.id).lifetime_points == 1000
    assert_invariants()


def test_200_concurrent_earns_on_one_account(accounts, points, assert_invariants):
    account = create_account(accounts)
    futures = [
        points.CreatePointsTransaction.future(
            points_pb2.CreatePointsTransactionRequest(account=account.id, type=EARN, amount=amount)
        )
        for amount in range(1, 201)
    ]
    results, errors = settle(futures)

    assert errors == []
    expected = sum(range(1, 201))
    after = get(accounts, account.id)
    assert (after.balance, after.lifetime_points) == (expected, expected)
    assert max(r.points_after for r in results) == expected
    assert len({r.points_after for r in results}) == 200
    assert_invariants()


def test_20_concurrent_creates_for_one_customer(accounts, assert_invariants):
    customer = unique()
    results, errors = at_once(accounts.CreateAccount, account_request(customer), 20)

    assert (len(results), len(errors)) == (1, 19)
    for error in errors:
        found = failed_with(error, ALREADY_EXISTS, "ACCOUNT_ALREADY_EXISTS")
        assert found.metadata["existingAccount"] == results[0].id
    listed = accounts.ListAccounts(
        accounts_pb2.ListAccountsRequest(program="prog_default", customer=customer)
    )
    assert [a.id for a in listed.accounts] == [results[0].id]
    assert_invariants()


def test_racing_merges_a_to_b_and_b_to_a(accounts, points, assert_invariants):
    for _ in range(5):
        a = funded_account(accounts, points, 100)
        b = funded_account(accounts, points, 250)
        futures = [
            accounts.MergeAccounts.future(
                accounts_pb2.MergeAccountsRequest(source=a.id, target=b.id), timeout=30
            ),
            accounts.MergeAccounts.future(
                accounts_pb2.MergeAccountsRequest(source=b.id, target=a.id), timeout=30
            ),
        ]
        results, errors = settle(futures)

        assert len(results) == 1, "exactly one merge wins"
        assert len(errors) == 1
        failed_with(errors[0], FAILED_PRECONDITION, "ACCOUNT_NOT_ACTIVE")
        winner = results[0]
        assert (winner.target.balance, winner.target.lifetime_points) == (350, 350)
        survivor = get(accounts, winner.target.id)
        merged = get(accounts, winner.source.id)
        assert (survivor.status, survivor.balance) == (ACTIVE, 350)
        assert (merged.status, merged.balance, merged.merged_into) == (MERGED, 0, survivor.id)
    assert_invariants()


def test_same_request_id_sent_20_times_at_once(accounts, points, assert_invariants):
    account = funded_account(accounts, points, 500)
    request = points_pb2.CreatePointsTransactionRequest(
        account=account.id, type=REDEEM, amount=70, request_id=unique("req")
    )
    results, errors = at_once(points.CreatePointsTransaction, request, 20)

    assert errors == []
    assert len(results) == 20
    assert all(r == results[0] for r in results)
    assert results[0].points_after == 430
    assert get(accounts, account.id).balance == 430
    listed = points.ListPointsTransactions(
        points_pb2.ListPointsTransactionsRequest(account=account.id, type=REDEEM)
    )
    assert len(listed.points_transactions) == 1
    assert_invariants()


def test_same_create_account_request_id_at_once(accounts, assert_invariants):
    request = account_request(request_id=unique("req"))
    results, errors = at_once(accounts.CreateAccount, request, 20)

    assert errors == []
    assert len({r.SerializeToString(deterministic=True) for r in results}) == 1
    assert_invariants()


def test_mixed_load_with_reversals_and_merges(accounts, points, assert_invariants):
    """Earns, redeems, reversals and merges interleaved on a few accounts."""
    members = [funded_account(accounts, points, 1000) for _ in range(4)]
    earns = [
        points.CreatePointsTransaction(
            points_pb2.CreatePointsTransactionRequest(account=m.id, type=EARN, amount=50)
        )
        for m in members
    ]
    futures = []
    for i in range(40):
        member = members[i % 4]
        futures.append(
            points.CreatePointsTransaction.future(
                points_pb2.CreatePointsTransactionRequest(
                    account=member.id, type=REDEEM if i % 2 else EARN, amount=7
                )
            )
        )
        if i % 10 == 0:
            futures.append(
                points.ReversePointsTransaction.future(
                    points_pb2.ReversePointsTransactionRequest(id=earns[i // 10].id, amount=5)
                )
            )
    futures.append(
        accounts.MergeAccounts.future(
            accounts_pb2.MergeAccountsRequest(source=members[0].id, target=members[1].id)
        )
    )
    futures.append(
        accounts.MergeAccounts.future(
            accounts_pb2.MergeAccountsRequest(source=members[2].id, target=members[3].id)
        )
    )
    _, errors = settle(futures)

    for error in errors:
        # Only calls that reached an account after it was merged may fail.
        assert failure(error).reason == "ACCOUNT_NOT_ACTIVE"
    total = sum(get(accounts, m.id).balance for m in members)
    ledger_total = 0
    for m in members:
        listed = points.ListPointsTransactions(
            points_pb2.ListPointsTransactionsRequest(account=m.id, page_size=100)
        )
        for ptx in listed.points_transactions:
            ledger_total += ptx.amount if ptx.direction == ptx.DIRECTION_CREDIT else -ptx.amount
    assert total == ledger_total
    assert_invariants()


def test_invariant_check_is_clean_while_the_ledger_is_written(accounts, points, database_url):
    from tests.conftest import find_violations

    members = [create_account(accounts) for _ in range(5)]
    futures = [
        points.CreatePointsTransaction.future(
            points_pb2.CreatePointsTransactionRequest(
                account=members[i % 5].id, type=EARN, amount=1 + i % 7
            )
        )
        for i in range(300)
    ]
    checks = [find_violations(database_url) for _ in range(3)]
    _, errors = settle(futures)

    assert errors == []
    assert checks == [[], [], []]
    assert sum(get(accounts, m.id).balance for m in members) == sum(1 + i % 7 for i in range(300))
