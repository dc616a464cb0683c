"""LoyaltyAccounts through the real server."""

from __future__ import annotations

import pytest
from google.protobuf import field_mask_pb2

from loyalty_service.pb import accounts_pb2, points_pb2, programs_pb2
from tests.support import (
    ACTIVE,
    ADJUST,
    ALREADY_EXISTS,
    CLOSED,
    CREDIT,
    EARN,
    FAILED_PRECONDITION,
    INVALID,
    MERGED,
    NOT_FOUND,
    REDEEM,
    Stubs,
    create_account,
    fails,
    funded_account,
    get,
    post,
    unique,
)


def test_create_and_get(accounts):
    customer = unique()
    created = create_account(accounts, customer, metadata={"signup_channel": "web"})

    assert created.id.startswith("loy_") and len(created.id) == 24
    assert (created.program, created.customer, created.status) == (
        "prog_default",
        customer,
        ACTIVE,
    )
    assert (created.balance, created.lifetime_points, created.tier) == (0, 0, "")
    assert dict(created.metadata) == {"signup_channel": "web"}
    assert created.create_time == created.update_time
    assert created.create_time.seconds > 0
    assert get(accounts, created.id) == created


def test_account_without_customer(accounts):
    first = create_account(accounts, "")
    second = create_account(accounts, "")
    assert first.customer == second.customer == ""
    assert first.id != second.id


def test_unknown_program_is_not_found(accounts):
    found = fails(
        accounts.CreateAccount,
        accounts_pb2.CreateAccountRequest(program="prog_nope", customer=unique()),
        NOT_FOUND,
        "PROGRAM_NOT_FOUND",
    )
    assert found.metadata == {"program": "prog_nope"}


@pytest.mark.parametrize(
    ("api", "method", "request_type", "missing", "reason", "key"),
    [
        pytest.param(
            "accounts",
            "GetAccount",
            accounts_pb2.GetAccountRequest,
            "loy_" + "A" * 20,
            "ACCOUNT_NOT_FOUND",
            "account",
            id="account",
        ),
        pytest.param(
            "programs",
            "GetProgram",
            programs_pb2.GetProgramRequest,
            "prog_" + "x" * 20,
            "PROGRAM_NOT_FOUND",
            "program",
            id="program",
        ),
        pytest.param(
            "points",
            "GetPointsTransaction",
            points_pb2.GetPointsTransactionRequest,
            "ptx_" + "Q" * 20,
            "POINTS_TRANSACTION_NOT_FOUND",
            "pointsTransaction",
            id="points_transaction",
        ),
    ],
)
def test_an_unknown_id_is_not_found(channel, api, method, request_type, missing, reason, key):
    """Each API's Get of a well-formed id that names nothing: NOT_FOUND naming the id."""
    call = getattr(getattr(Stubs(channel), api), method)
    found = fails(call, request_type(id=missing), NOT_FOUND, reason)
    assert found.metadata == {key: missing}


def test_second_active_account_for_customer_is_already_exists(accounts):
    customer = unique()
    first = create_account(accounts, customer)
    found = fails(
        accounts.CreateAccount,
        accounts_pb2.CreateAccountRequest(program="prog_default", customer=customer),
        ALREADY_EXISTS,
        "ACCOUNT_ALREADY_EXISTS",
    )
    assert found.metadata["existingAccount"] == first.id


def test_update_customer_and_metadata(accounts):
    account = create_account(accounts, metadata={"a": "1"})
    new_customer = unique()
    updated = accounts.UpdateAccount(
        accounts_pb2.UpdateAccountRequest(
            account=accounts_pb2.Account(id=account.id, customer=new_customer, metadata={"b": "2"}),
            update_mask=field_mask_pb2.FieldMask(paths=["customer"]),
        )
    )
    assert updated.customer == new_customer
    assert dict(updated.metadata) == {"a": "1"}, "metadata is not in the mask"
    assert updated.update_time.ToDatetime() > account.update_time.ToDatetime()

    updated = accounts.UpdateAccount(
        accounts_pb2.UpdateAccountRequest(
            account=accounts_pb2.Account(id=account.id, metadata={"b": "2"}),
            update_mask=field_mask_pb2.FieldMask(paths=["metadata"]),
        )
    )
    assert (updated.customer, dict(updated.metadata)) == (new_customer, {"b": "2"})
    assert get(accounts, account.id) == updated


def test_update_without_mask_sets_given_fields_and_clearing_customer(accounts):
    account = create_account(accounts)
    updated = accounts.UpdateAccount(
        accounts_pb2.UpdateAccountRequest(
            account=accounts_pb2.Account(id=account.id, metadata={"tier_hint": "gold"})
        )
    )
    assert (updated.customer, dict(updated.metadata)) == (account.customer, {"tier_hint": "gold"})
    cleared = accounts.UpdateAccount(
        accounts_pb2.UpdateAccountRequest(
            account=accounts_pb2.Account(id=account.id),
            update_mask=field_mask_pb2.FieldMask(paths=["customer"]),
        )
    )
    assert cleared.customer == ""


def test_update_to_a_customer_with_an_active_account_is_already_exists(accounts):
    taken = create_account(accounts)
    other = create_account(accounts)
    found = fails(
        accounts.UpdateAccount,
        accounts_pb2.UpdateAccountRequest(
            account=accounts_pb2.Account(id=other.id, customer=taken.customer),
            update_mask=field_mask_pb2.FieldMask(paths=["customer"]),
        ),
        ALREADY_EXISTS,
        "ACCOUNT_ALREADY_EXISTS",
    )
    assert found.metadata["existingAccount"] == taken.id
    assert get(accounts, other.id).customer == other.customer, "no partial write"


def test_close_and_reopen(accounts, points):
    account = funded_account(accounts, points, 40)
    closed = accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=account.id))
    assert (closed.status, closed.balance) == (CLOSED, 40)

    found = fails(
        points.CreatePointsTransaction,
        _earn(account.id, 5),
        FAILED_PRECONDITION,
        "ACCOUNT_NOT_ACTIVE",
    )
    assert found.metadata == {"account": account.id, "status": "CLOSED"}
    fails(
        accounts.CloseAccount,
        accounts_pb2.CloseAccountRequest(id=account.id),
        FAILED_PRECONDITION,
        "ACCOUNT_NOT_ACTIVE",
    )
    assert get(accounts, account.id).status == CLOSED, "still readable"

    reopened = accounts.ReopenAccount(accounts_pb2.ReopenAccountRequest(id=account.id))
    assert (reopened.status, reopened.balance) == (ACTIVE, 40)
    assert post(points, account.id, EARN, 5).points_after == 45
    fails(
        accounts.ReopenAccount,
        accounts_pb2.ReopenAccountRequest(id=account.id),
        FAILED_PRECONDITION,
        "ACCOUNT_NOT_CLOSED",
    )


def test_reopen_that_would_make_a_second_active_account(accounts):
    customer = unique()
    old = create_account(accounts, customer)
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=old.id))
    new = create_account(accounts, customer)
    found = fails(
        accounts.ReopenAccount,
        accounts_pb2.ReopenAccountRequest(id=old.id),
        ALREADY_EXISTS,
        "ACCOUNT_ALREADY_EXISTS",
    )
    assert found.metadata["existingAccount"] == new.id
    assert get(accounts, old.id).status == CLOSED


def test_merge_moves_points_and_history(accounts, points):
    source = funded_account(accounts, points, 300)
    post(points, source.id, REDEEM, 100)
    target = funded_account(accounts, points, 50)
    post(points, target.id, ADJUST, 7, direction=CREDIT)

    merged = accounts.MergeAccounts(
        accounts_pb2.MergeAccountsRequest(source=source.id, target=target.id)
    )

    assert (merged.target.id, merged.target.balance, merged.target.lifetime_points) == (
        target.id,
        257,
        357,
    )
    assert (merged.source.status, merged.source.balance, merged.source.merged_into) == (
        MERGED,
        0,
        target.id,
    )
    assert get(accounts, source.id) == merged.source
    assert get(accounts, target.id) == merged.target
    history = points.ListPointsTransactions(_list(target.id)).points_transactions
    assert len(history) == 4
    moved = [t for t in history if t.original_account]
    assert {t.original_account for t in moved} == {source.id}
    assert sorted(t.amount for t in moved) == [100, 300]
    assert all(t.account == target.id for t in history)
    assert points.ListPointsTransactions(_list(source.id)).points_transactions == []

    # The survivor keeps working; the source is frozen.
    assert post(points, target.id, REDEEM, 257).points_after == 0
    fails(
        points.CreatePointsTransaction,
        _earn(source.id, 1),
        FAILED_PRECONDITION,
        "ACCOUNT_NOT_ACTIVE",
    )
    fails(
        accounts.ReopenAccount,
        accounts_pb2.ReopenAccountRequest(id=source.id),
        FAILED_PRECONDITION,
        "ACCOUNT_NOT_CLOSED",
    )
    fails(
        accounts.UpdateAccount,
        accounts_pb2.UpdateAccountRequest(
            account=accounts_pb2.Account(id=source.id, metadata={"a": "b"})
        ),
        FAILED_PRECONDITION,
        "ACCOUNT_NOT_ACTIVE",
    )


def test_merge_failures(accounts, points):
    a = create_account(accounts)
    b = create_account(accounts)
    missing = "loy_" + "Z" * 20
    fails(
        accounts.MergeAccounts,
        accounts_pb2.MergeAccountsRequest(source=a.id, target=missing),
        NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    found = fails(
        accounts.MergeAccounts,
        accounts_pb2.MergeAccountsRequest(source=a.id, target=a.id),
        INVALID,
        "INVALID_ARGUMENT",
    )
    assert "target" in found.field_violations
    accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=b.id))
    fails(
        accounts.MergeAccounts,
        accounts_pb2.MergeAccountsRequest(source=a.id, target=b.id),
        FAILED_PRECONDITION,
        "ACCOUNT_NOT_ACTIVE",
    )
    assert get(accounts, a.id).status == ACTIVE


def test_list_accounts_filters_and_pages(accounts):
    customer = unique()
    ids = []
    for _ in range(4):
        account = create_account(accounts, customer)
        accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=account.id))
        ids.append(account.id)
    ids.append(create_account(accounts, customer).id)
    newest_first = ids[::-1]

    first = accounts.ListAccounts(accounts_pb2.ListAccountsRequest(customer=customer, page_size=2))
    assert [a.id for a in first.accounts] == newest_first[:2]
    # A row inserted between pages does not shift the keyset.
    create_account(accounts, unique())
    second = accounts.ListAccounts(
        accounts_pb2.ListAccountsRequest(
            customer=customer, page_size=2, page_token=first.next_page_token
        )
    )
    assert [a.id for a in second.accounts] == newest_first[2:4]
    third = accounts.ListAccounts(
        accounts_pb2.ListAccountsRequest(
            customer=customer, page_size=2, page_token=second.next_page_token
        )
    )
    assert [a.id for a in third.accounts] == newest_first[4:]
    assert third.next_page_token == ""

    closed = accounts.ListAccounts(
        accounts_pb2.ListAccountsRequest(customer=customer, status=CLOSED)
    )
    assert [a.id for a in closed.accounts] == newest_first[1:]
    active = accounts.ListAccounts(
        accounts_pb2.ListAccountsRequest(program="prog_default", customer=customer, status=ACTIVE)
    )
    assert [a.id for a in active.accounts] == newest_first[:1]


def test_page_size_defaults_to_10(accounts):
    customer = unique()
    for _ in range(11):
        account = create_account(accounts, customer)
        accounts.CloseAccount(accounts_pb2.CloseAccountRequest(id=account.id))
    page = accounts.ListAccounts(accounts_pb2.ListAccountsRequest(customer=customer))
    assert len(page.accounts) == 10 and page.next_page_token
    rest = accounts.ListAccounts(
        accounts_pb2.ListAccountsRequest(customer=customer, page_token=page.next_page_token)
    )
    assert len(rest.accounts) == 1 and rest.next_page_token == ""


def _earn(account_id: str, amount: int) -> points_pb2.CreatePointsTransactionRequest:
    return points_pb2.CreatePointsTransactionRequest(account=account_id, type=EARN, amount=amount)


def _list(account_id: str) -> points_pb2.ListPointsTransactionsRequest:
    return points_pb2.ListPointsTransactionsRequest(account=account_id)


def test_merge_across_programs_is_refused(accounts, programs):
    other = unique("prog_other")
    programs.CreateProgram(
        programs_pb2.CreateProgramRequest(
            program=programs_pb2.Program(name="Other", currency="USD"), program_id=other
        )
    )
    a = create_account(accounts)
    b = accounts.CreateAccount(
        accounts_pb2.CreateAccountRequest(program=other, customer=a.customer)
    )
    assert b.program == other, "one ACTIVE account per customer per program"
    found = fails(
        accounts.MergeAccounts,
        accounts_pb2.MergeAccountsRequest(source=a.id, target=b.id),
        FAILED_PRECONDITION,
        "PROGRAM_MISMATCH",
    )
    assert (found.metadata["sourceProgram"], found.metadata["targetProgram"]) == (
        "prog_default",
        other,
    )
